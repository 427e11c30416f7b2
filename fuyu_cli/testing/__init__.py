"""Random Fuyu checkpoints in the real on-disk layout (tiny tokenizer included), for trying fuyu without
weights, for the tests and for the benchmarks."""

from fuyu.testing.checkpoint import make_checkpoint

__all__ = ["make_checkpoint"]
