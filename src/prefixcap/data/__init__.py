"""Datasets: input readers, image and caption decoding, the preprocessed-shard format, training batches."""
