"""gramlin-analyze: Gram, virtual covariance and target linearity over saved training runs."""

from gramlin_analyze._version import __version__

__all__ = ["__version__"]
