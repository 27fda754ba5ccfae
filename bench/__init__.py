"""Benchmarks: prefixcap against faithful re-implementations of the original ClipCap loops."""
