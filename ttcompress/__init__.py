"""ttcompress: compress trained PyTorch models with tensor decompositions."""

from ttcompress._version import __version__

__all__ = ["__version__"]
