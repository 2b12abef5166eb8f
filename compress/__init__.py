"""Checkpoint I/O, architecture adapters, the layer stream, pruning and quantization."""
