"""Sources: the inputs of a split (CSV files, image folders, tar shards, TFRecords) as Arrow
RecordBatches, with a dead letter for each record that cannot be read."""
