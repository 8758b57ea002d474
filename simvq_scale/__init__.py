"""simvq-scale: a distributed trainer for SimVQ tokenizers."""

__version__ = "0.1.0"
