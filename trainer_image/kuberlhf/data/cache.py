"""Tokenised data cached on disk, safe when every rank of every node starts at once.

The cache entry's name is a digest of (encoding kind and options, max length, tokenizer, caller's key, e.g. the
data spec hash + stage + split, and the rows' content). One process per cache directory tokenises under a file
lock and publishes with an atomic rename of a finished temporary directory; the others wait on the lock and then
memory-map the result. The rename alone keeps readers safe where locks are unreliable (some network filesystems):
a half-written entry never carries the final name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
from filelock import FileLock, Timeout

from kuberlhf.data.encode import ENCODERS
from kuberlhf.data.errors import DataError

ENCODING_VERSION = 1  # bump when encode.py changes what it produces, to invalidate old entries


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kuberlhf" / "tokenized"


def tokenizer_hash(tokenizer: Any) -> str:
    """A digest of everything in a tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
               getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]
    h.update(json.dumps(special, default=str).encode())
    return h.hexdigest()[:16]


def rows_hash(rows: datasets.Dataset) -> str:
    """A digest of the rows' content (column names and every value), independent of how they were loaded."""
    h = hashlib.sha256()
    for col in sorted(rows.column_names):
        h.update(b"\0col\0" + col.encode())
        for batch in rows.select_columns([col]).iter(batch_size=10_000):
            for value in batch[col]:
                h.update(b"\0" + str(value).encode())
    return h.hexdigest()[:16]


def cache_key(rows: datasets.Dataset, tokenizer: Any, kind: str, max_len: int, key: str = "",
              options: Mapping[str, Any] | None = None) -> str:
    doc = {"v": ENCODING_VERSION, "kind": kind, "max_len": max_len, "options": dict(options or {}),
           "tokenizer": tokenizer_hash(tokenizer), "key": key, "rows": rows_hash(rows), "n": len(rows)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def encode_rows(rows: datasets.Dataset, tokenizer: Any, kind: str, max_len: int,
                options: Mapping[str, Any] | None = None) -> datasets.Dataset:
    """Tokenise in memory (no datasets cache files, so concurrent ranks never race on them)."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoding kind {kind!r}: expected one of {', '.join(ENCODERS)}")
    opts = dict(options or {})
    encoder = ENCODERS[kind]
    return rows.map(lambda b: encoder(b, tokenizer, max_len, opts), batched=True, batch_size=1000,
                    remove_columns=rows.column_names, keep_in_memory=True, desc=f"tokenizing ({kind})")


def tokenize_cached(rows: datasets.Dataset, tokenizer: Any, kind: str, max_len: int, *,
                    cache_dir: str | Path | None, key: str = "", options: Mapping[str, Any] | None = None,
                    lock_timeout_s: float = 6 * 3600) -> datasets.Dataset:
    """Token ids of rows (kind: sft | pair | prompt | ptx, see kuberlhf.data.encode), from the cache when an
    entry exists, else tokenised once by whichever process gets the lock. cache_dir None: no cache."""
    if cache_dir is None:
        return encode_rows(rows, tokenizer, kind, max_len, options)
    root = Path(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the tokenised-data cache directory {root}: {e.strerror}; point "
                        f"XDG_CACHE_HOME at a writable directory") from None
    final = root / f"{kind}-{cache_key(rows, tokenizer, kind, max_len, key, options)}"
    if final.is_dir():
        return datasets.load_from_disk(str(final))
    try:
        with FileLock(str(final) + ".lock", timeout=lock_timeout_s):
            if not final.is_dir():
                _publish(encode_rows(rows, tokenizer, kind, max_len, options), final)
    except Timeout:
        raise DataError(f"waited {lock_timeout_s:.0f}s for another process tokenising into {final}; if no "
                        f"process is doing so, delete {final}.lock") from None
    return datasets.load_from_disk(str(final))


def _publish(encoded: datasets.Dataset, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        encoded.save_to_disk(str(tmp))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another writer won the race (no working lock on this filesystem): its entry is identical.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
