"""bernini: a faithful, fast and robust runner for the Bernini-R video renderer."""

__version__ = "0.1.0"
