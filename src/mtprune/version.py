"""The package version (one place; read by the package, checkpoints and plans)."""

__version__ = "0.1.0"
