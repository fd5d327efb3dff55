"""lctool: adapt and compress open transformer language models, checkpoint in, checkpoint out."""

__version__ = "0.1.0"
