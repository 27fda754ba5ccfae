"""Dataset readers, image decoding, the preprocessed-shard format and the preprocess runner."""
