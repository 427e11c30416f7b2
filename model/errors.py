"""Errors the model package raises for bad checkpoints; the CLI turns them into one-line messages."""


class CheckpointError(ValueError):
    """A checkpoint directory cannot be used: the message names the file or tensor and what to do."""


class InsufficientMemory(CheckpointError, MemoryError):
    """The weights cannot fit in the memory the process may use: raised before any is read."""
