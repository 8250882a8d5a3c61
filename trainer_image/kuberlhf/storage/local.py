"""The file:// backend: the same operations on a local (or shared) filesystem. Every write goes to a temp
name in the target directory, is fsynced and renamed into place, so a crash never leaves a torn file under
its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kuberlhf.storage.errors import StorageError
from kuberlhf.storage.manifest import PART_SUFFIX, FileEntry, verify_local_file
from kuberlhf.storage.uri import ParsedUri


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_copy(src: Path, dest: Path, *, fsync: bool = True) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}{PART_SUFFIX}")
    try:
        shutil.copyfile(src, tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}{PART_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LocalBackend:
    scheme = "file"
    label = "local filesystem"

    def __init__(self, workers: int = 8) -> None:
        self.workers = workers

    @staticmethod
    def _path(target: ParsedUri) -> Path:
        return Path(target.key)

    def check_bucket(self, target: ParsedUri) -> None:
        return None

    def put_bytes(self, target: ParsedUri, data: bytes) -> None:
        try:
            atomic_write(self._path(target), data)
        except OSError as e:
            raise StorageError(f"writing {target} failed: {e}") from e

    def get_bytes(self, target: ParsedUri) -> bytes | None:
        try:
            return self._path(target).read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return None
        except OSError as e:
            raise StorageError(f"reading {target} failed: {e}") from e

    def exists(self, target: ParsedUri) -> bool:
        return self._path(target).is_file()

    def delete(self, target: ParsedUri) -> None:
        path = self._path(target)
        path.unlink(missing_ok=True)
        if path.parent.exists():
            _fsync_dir(path.parent)

    def remote_matches(self, target: ParsedUri, entry: FileEntry) -> bool:
        return verify_local_file(self._path(target), entry) is None

    def list_sizes(self, target: ParsedUri) -> dict[str, int]:
        root = self._path(target)
        out: dict[str, int] = {}
        if not root.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.endswith(PART_SUFFIX):
                    continue
                full = Path(dirpath) / name
                out[full.relative_to(root).as_posix()] = full.stat().st_size
        return out

    def list_children(self, target: ParsedUri) -> list[str]:
        root = self._path(target)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    def delete_keys(self, target: ParsedUri, rel_keys: list[str]) -> None:
        root = self._path(target)
        for rel in rel_keys:
            (root / rel).unlink(missing_ok=True)
        # prune the now-empty directories, deepest first
        if root.is_dir():
            for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def upload_files(self, items: list[tuple[Path, ParsedUri, FileEntry]]) -> None:
        self._parallel([(src, self._path(t)) for src, t, _e in items], fsync=True)

    def download_files(
        self, items: list[tuple[ParsedUri, Path]], on_file_done: Callable[[int], None] | None = None
    ) -> None:
        # downloads are verified (and re-verified on resume), so no fsync is needed for them
        self._parallel([(self._path(s), d) for s, d in items], fsync=False, on_file_done=on_file_done)

    def _parallel(
        self, pairs: list[tuple[Path, Path]], *, fsync: bool, on_file_done: Callable[[int], None] | None = None
    ) -> None:
        def one(indexed: tuple[int, tuple[Path, Path]]) -> None:
            i, (src, dest) = indexed
            try:
                atomic_copy(src, dest, fsync=fsync)
            except FileNotFoundError as e:
                raise StorageError(f"copying {src} -> {dest} failed: {e.filename} does not exist") from e
            except OSError as e:
                raise StorageError(f"copying {src} -> {dest} failed: {e}") from e
            if on_file_done is not None:
                on_file_done(i)

        if not pairs:
            return
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kuberlhf-copy") as pool:
            list(pool.map(one, enumerate(pairs)))
