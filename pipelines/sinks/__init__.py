"""Sinks: what a run writes per split: transformed examples as TFRecord shards, dead letters,
row counts."""
