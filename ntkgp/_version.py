"""The version of ntkgp: the one place it is stated (pyproject.toml reads it)."""

__version__ = "0.2.0.dev0"
