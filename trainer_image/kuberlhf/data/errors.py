"""The data layer's one error type: every message names the dataset/file and says how to fix it."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset that cannot be loaded or adapted (unknown name, missing file, missing columns, offline hub)."""
