"""retrbench: benchmark frozen neural networks for instance-level image retrieval."""

__version__ = "0.1.0"
