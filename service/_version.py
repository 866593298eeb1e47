"""The one place the hmaopt version is written (pyproject reads it, manifests record it)."""

__version__ = "0.1.0"
