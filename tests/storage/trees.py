"""Checkpoint-like directory trees for the storage tests."""

from __future__ import annotations

import os
from pathlib import Path


def write_tree(root: Path, files: dict[str, bytes | int]) -> Path:
    """Create ``files`` under ``root``: bytes are written as is, an int N writes N random bytes."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            if isinstance(content, int):
                remaining = content
                while remaining:
                    n = min(remaining, 8 << 20)
                    f.write(os.urandom(n))
                    remaining -= n
            else:
                f.write(content)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
