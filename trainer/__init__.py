"""The Keras trainer over a pipeline's TFRecords, its export, and TensorFlow-only serving."""
