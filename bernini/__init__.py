"""bernini: a faithful, fast and robust runner for the Bernini-R video renderer."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    # `import bernini` stays light: the Python API (and torch) load on first use of bernini.Engine.
    if name == "Engine":
        from bernini.engine import Engine

        return Engine
    raise AttributeError(f"module 'bernini' has no attribute {name!r}")
