"""lmlab: a CPU-first lab for experimenting with how small language models learn."""

__version__ = "0.1.0"
