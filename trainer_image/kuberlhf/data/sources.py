"""Loading one DatasetRef into rows of prompt / chosen / rejected: built-in datasets shipped in the package,
local files (json, jsonl, parquet, csv), local directories (the hub's file layout or ``save_to_disk``), s3:// or
file:// URIs, and hub names through ``datasets.load_dataset``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets

from kuberlhf.contract.spec import DatasetRef, StorageSpec
from kuberlhf.data.adapters import (
    ADAPTERS,
    Adapter,
    adapter_for_columns,
    adapter_for_path,
    get_adapter,
    known_names,
    missing_columns,
)
from kuberlhf.data.builtins import BUILTIN_DIR, BUILTINS  # noqa: F401 - BUILTIN_DIR re-exported
from kuberlhf.data.errors import DataError
from kuberlhf.data.format import format_prompt, format_response

COLUMNS = ("prompt", "chosen", "rejected")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")
_TRUE = ("1", "true", "yes", "on")


def hub_offline(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any(env.get(k, "").strip().lower() in _TRUE for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def all_known_names() -> list[str]:
    return sorted(BUILTINS) + known_names()


def describe(ref: DatasetRef) -> str:
    return f"dataset {ref.name!r}" if ref.name else f"dataset file {ref.path!r}"


# ---------------------------------------------------------------------------------------------- raw loading


def read_file(path: Path) -> datasets.Dataset:
    """A local json (list of objects, dict of columns, or {'<split>': [...]}), jsonl, parquet or csv file."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist: fix data.datasets[].path "
                        f"(a .json/.jsonl/.parquet/.csv file or a dataset directory)")
    if suffix == ".jsonl":
        return _from_records(_read_jsonl(path), path)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            # Many ".json" files are really JSON lines.
            return _from_records(_read_jsonl(path), path)
        return _from_json_doc(doc, path)
    if suffix == ".txt":
        # A plain-text corpus (ptx): one row per non-empty line, in column "text".
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise DataError(f"dataset file {str(path)!r} holds no text")
        return datasets.Dataset.from_dict({"text": lines})
    if suffix in (".parquet", ".csv"):
        import pyarrow.csv
        import pyarrow.parquet
        from datasets.table import InMemoryTable

        try:
            table = pyarrow.parquet.read_table(path) if suffix == ".parquet" else pyarrow.csv.read_csv(path)
        except Exception as e:  # pyarrow raises several types; the message is what the user needs
            raise DataError(f"cannot read dataset file {str(path)!r}: {e}") from None
        return datasets.Dataset(InMemoryTable(table))
    raise DataError(f"dataset file {str(path)!r} has an unsupported type {suffix or '(none)'!r}: "
                    f"use one of {', '.join(FILE_SUFFIXES)} or a dataset directory")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"dataset file {str(path)!r} line {lineno} is not valid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(f"dataset file {str(path)!r} line {lineno} is not a JSON object")
            records.append(rec)
    return records


def _from_json_doc(doc: Any, path: Path) -> datasets.Dataset:
    if isinstance(doc, list):
        return _from_records(doc, path)
    if isinstance(doc, dict):
        values = list(doc.values())
        if values and all(isinstance(v, list) for v in values):
            if all(v and isinstance(v[0], dict) for v in values):
                # {"train": [...], "test": [...]}: splits of records
                return _from_records([r for v in values for r in v], path)
            if len({len(v) for v in values}) == 1:
                return datasets.Dataset.from_dict(doc)  # a dict of columns
    raise DataError(f"dataset file {str(path)!r} must hold a list of objects, a dict of equal-length columns, "
                    f"or JSON lines")


def _from_records(records: list[Any], path: Path) -> datasets.Dataset:
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"dataset file {str(path)!r} must hold JSON objects (one row each)")
    if not records:
        raise DataError(f"dataset file {str(path)!r} holds no rows")
    try:
        return datasets.Dataset.from_list(records)
    except (ValueError, TypeError, OverflowError) as e:  # pyarrow's ArrowInvalid/ArrowTypeError are ValueErrors
        raise DataError(f"dataset file {str(path)!r}: the rows do not have consistent column types ({e}); give "
                        f"every row the same fields with string values") from None


def read_directory(path: Path) -> datasets.Dataset:
    """A directory written by ``save_to_disk`` or laid out like a hub dataset repository (data/*.parquet,
    *.jsonl, train-*.json ...); every split is used, train first."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _concat_splits(datasets.load_from_disk(str(path)))
    try:
        loaded = datasets.load_dataset(str(path))
    except Exception as e:  # FileNotFoundError, EmptyDatasetError, DatasetGenerationError ...
        raise DataError(f"cannot load dataset directory {str(path)!r}: {e}. It must hold data files "
                        f"({', '.join(FILE_SUFFIXES)}, e.g. data/train-00000-of-00001.parquet) "
                        f"or a Dataset.save_to_disk() directory") from None
    return _concat_splits(loaded)


def _concat_splits(obj: datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset:
    if isinstance(obj, datasets.Dataset):
        return obj
    names = sorted(obj, key=lambda s: (s != "train", s))
    if len(names) == 1:
        return obj[names[0]]
    try:
        return datasets.concatenate_datasets([obj[n] for n in names])
    except ValueError:
        # Splits with different columns (some hub datasets): the train split alone is the dataset.
        return obj[names[0]]


def read_hub(name: str, config: str | None) -> datasets.Dataset:
    """A hub dataset via ``datasets.load_dataset`` (its own cache makes concurrent ranks safe)."""
    try:
        return _concat_splits(datasets.load_dataset(name, config))
    except Exception as e:
        if hub_offline():
            raise DataError(
                f"hub dataset {name!r} is not available: the hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE "
                f"is set) and it is not in the local datasets cache. Download it where a hub is reachable "
                f"(e.g. `huggingface-cli download --repo-type dataset {name} --local-dir /data/{name}`) and "
                f"use a local path: data.datasets: [{{path: /data/{name}}}]. "
                f"Known names: {', '.join(all_known_names())}") from None
        raise DataError(f"cannot load hub dataset {name!r}: {e}. Known names: {', '.join(all_known_names())}; "
                        f"or give a local path") from None


def localize(uri: str, storage: StorageSpec | None = None, cache_dir: Path | None = None) -> Path:
    """A local path for a file:// or s3:// URI or a plain path. s3:// objects are downloaded with the pipeline's
    storage settings (endpoint, credentials from the environment) into a cache: a single file (.jsonl, .parquet
    ...) with get_bytes, a directory with download_dir (a committed prefix, as ``upload_dir`` writes)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if not uri.startswith("s3://"):
        return Path(uri).expanduser()
    import hashlib

    from kuberlhf.storage import ObjectStore, StorageError

    store = ObjectStore.from_spec(storage) if storage is not None else ObjectStore.from_uri(uri)
    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kuberlhf" / "datasets"
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    try:
        if uri.lower().endswith(FILE_SUFFIXES):
            dest = target / uri.rstrip("/").rsplit("/", 1)[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Several ranks may download at once: each writes its own temporary file, the rename is atomic.
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            tmp.write_bytes(store.get_bytes(uri))
            os.replace(tmp, dest)
            return dest
        store.download_dir(uri, target)
    except StorageError as e:
        raise DataError(f"cannot download dataset {uri}: {e}") from None
    return target


# ---------------------------------------------------------------------------------------------- adapting


def resolve(ref: DatasetRef, storage: StorageSpec | None = None) -> tuple[datasets.Dataset, Adapter, str]:
    """The raw rows of a reference, the adapter for them, and a label naming the source in errors."""
    hint = get_adapter(ref.adapter) if getattr(ref, "adapter", None) else None
    if ref.name is not None:
        name = ref.name.strip()
        label = f"dataset {name!r}"
        if name.lower() in BUILTINS:
            return read_file(BUILTINS[name.lower()]), hint or ADAPTERS["prompt/chosen/rejected"], label
        if name.lower().startswith("kuberlhf/"):
            raise DataError(f"unknown built-in dataset {name!r}: known names are {', '.join(all_known_names())}")
        raw = read_hub(name, ref.config)
        adapter = hint or ADAPTERS.get(name.lower()) or adapter_for_columns(raw.column_names)
        if adapter is None:
            raise DataError(f"unknown dataset {name!r}: no adapter for its columns {raw.column_names}. Known "
                            f"names are {', '.join(all_known_names())}; other datasets need columns "
                            f"prompt, chosen (and rejected)")
        return raw, adapter, label
    path_str = ref.path or ""
    path = localize(path_str, storage)
    label = f"dataset file {path_str!r}"
    if path.is_dir():
        raw = read_directory(path)
        label = f"dataset directory {path_str!r}"
    elif path.exists() or path.suffix:
        raw = read_file(path)
    else:
        raise DataError(f"dataset path {path_str!r} does not exist: fix data.datasets[].path "
                        f"(a .json/.jsonl/.parquet/.csv file or a dataset directory)")
    adapter = hint or adapter_for_path(path_str) or adapter_for_columns(raw.column_names)
    if adapter is None:
        raise DataError(f"{label} has columns {raw.column_names} but needs columns prompt, chosen (and rejected "
                        f"for steps 2 and 3), or the columns of a known dataset ({', '.join(known_names())}; "
                        f"set data.datasets[].adapter)")
    return raw, adapter, label


def adapt(raw: datasets.Dataset, adapter: Adapter, label: str) -> datasets.Dataset:
    """Rows prompt / chosen / rejected in the Human/Assistant format; rows without a prompt or chosen answer (or
    that the adapter drops) are skipped."""
    missing = missing_columns(adapter, raw.column_names)
    if missing:
        raise DataError(f"{label} is missing column(s) {', '.join(missing)} needed by the {adapter.name} "
                        f"adapter (it has {', '.join(raw.column_names)})")
    out: dict[str, list[str]] = {c: [] for c in COLUMNS}
    for batch in raw.iter(batch_size=1000):
        keys = list(batch)
        for i in range(len(batch[keys[0]])):
            triple = adapter.convert({k: batch[k][i] for k in keys})
            if triple is None:
                continue
            prompt, chosen, rejected = triple
            if not prompt.strip() or not chosen.strip():
                continue
            out["prompt"].append(format_prompt(prompt))
            out["chosen"].append(format_response(chosen))
            out["rejected"].append(format_response(rejected) if rejected.strip() else "")
    if not out["prompt"]:
        raise DataError(f"{label} has no usable rows (every row lacks a prompt or a chosen answer)")
    return datasets.Dataset.from_dict(out, features=datasets.Features({c: datasets.Value("string") for c in COLUMNS}))


def load_rows(ref: DatasetRef, *, storage: StorageSpec | None = None) -> datasets.Dataset:
    """One dataset as rows of prompt / chosen / rejected strings (rejected "" where the dataset has none),
    prompts as ' Human: ... Assistant:' and answers as ' ...' (kuberlhf.data.format). ``storage``: the
    pipeline's storage settings, used for s3:// paths."""
    raw, adapter, label = resolve(ref, storage)
    return adapt(raw, adapter, label)


def load_texts(ref: DatasetRef, text_field: str = "text", *, storage: StorageSpec | None = None) -> datasets.Dataset:
    """A plain-text corpus (ptx in step 3) as one column ``text``; empty lines are dropped."""
    if ref.name is not None and ref.name.strip().lower() in BUILTINS:
        raw, label = read_file(BUILTINS[ref.name.strip().lower()]), f"dataset {ref.name!r}"
    elif ref.name is not None:
        raw, label = read_hub(ref.name.strip(), ref.config), f"dataset {ref.name!r}"
    else:
        path = localize(ref.path or "", storage)
        raw = read_directory(path) if path.is_dir() else read_file(path)
        label = f"dataset file {ref.path!r}"
    if text_field not in raw.column_names:
        raise DataError(f"{label} has no column {text_field!r} for the unsupervised corpus (it has "
                        f"{', '.join(raw.column_names)}): set data.unsupervisedTextField")
    texts = [t for t in raw[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{label} has no non-empty text in column {text_field!r}")
    return datasets.Dataset.from_dict({"text": texts})
