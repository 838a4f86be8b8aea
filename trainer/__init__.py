"""The Keras trainer over the pipeline's TFRecords (being built; see the README)."""
