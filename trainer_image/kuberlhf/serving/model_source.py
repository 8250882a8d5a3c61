"""Where the served model comes from: a local Hugging Face directory, or an s3:// / file:// checkpoint prefix
downloaded through :class:`kuberlhf.storage.ObjectStore` (which refuses prefixes without ``_COMPLETE`` and
verifies every file's sha256). No torch here: the checks run before anything heavy loads."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from kuberlhf.contract.stage import ENV_STORAGE_ENDPOINT

URI_SCHEMES = ("s3://", "file://")
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class ModelSourceError(RuntimeError):
    """The model cannot be served as given; the message names the path and what to do."""


def is_uri(source: str) -> bool:
    return source.startswith(URI_SCHEMES)


def model_display_name(source: str) -> str:
    """The id shown by /v1/models: the last meaningful path part ("ema", "model" get their stage prefixed, so
    `.../ppo/ema/` reads "ppo-ema")."""
    parts = [p for p in source.rstrip("/").replace("://", "/").split("/") if p]
    if not parts:
        return "model"
    if len(parts) >= 2 and parts[-1] in {"model", "ema"}:
        return f"{parts[-2]}-{parts[-1]}"
    return parts[-1]


def check_hf_model_dir(path: Path) -> None:
    """Raise ModelSourceError unless ``path`` looks like a complete HF causal-LM directory (config, all weight
    shards the index names, a tokenizer)."""
    if not path.exists():
        raise ModelSourceError(
            f"model directory {path} does not exist: pass a local Hugging Face model directory "
            "or an s3:// / file:// checkpoint URI"
        )
    if not path.is_dir():
        raise ModelSourceError(f"model path {path} is a file: pass the directory that holds config.json")
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"{path} is not a Hugging Face model: it has no config.json (pass a stage's model/ or ema/ directory)"
        )
    for index_name in WEIGHT_INDEXES:
        index = path / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError) as exc:
                raise ModelSourceError(f"incomplete checkpoint: {index} is not a valid weight index ({exc})") from exc
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise ModelSourceError(
                    f"incomplete checkpoint in {path}: weight shards {', '.join(missing)} named by {index_name} "
                    "are missing (copy the whole directory, or wait for the stage to finish)"
                )
            break
    else:
        if not any(any(path.glob(g)) for g in WEIGHT_GLOBS):
            raise ModelSourceError(
                f"incomplete checkpoint in {path}: no weight files (*.safetensors or pytorch_model*.bin); "
                "copy the whole directory, or wait for the stage to finish"
            )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelSourceError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the tokenizer next to the model"
        )


def default_cache_dir(uri: str) -> Path:
    """A per-URI download folder, so restarts reuse verified files (download_dir skips them)."""
    root = Path(os.environ.get("KUBERLHF_CACHE") or Path.home() / ".cache" / "kuberlhf") / "models"
    return root / hashlib.sha256(uri.encode()).hexdigest()[:16]


def resolve_model(
    source: str,
    *,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """A local, checked HF model directory for ``source`` (downloading URIs through the object store)."""
    env = os.environ if env is None else env
    if not is_uri(source):
        path = Path(source).expanduser()
        check_hf_model_dir(path)
        return path

    from kuberlhf.storage import IncompleteCheckpointError, ObjectStore, StorageError

    endpoint = endpoint or env.get(ENV_STORAGE_ENDPOINT) or None
    target = cache_dir or default_cache_dir(source)
    target.mkdir(parents=True, exist_ok=True)
    try:
        store = ObjectStore.from_uri(source, endpoint=endpoint, env=env)
        store.download_dir(source, target)
    except IncompleteCheckpointError as exc:
        hint = ""
        try:
            if not source.rstrip("/").endswith(("/model", "/ema")) and store.is_complete(source.rstrip("/") + "/model"):
                hint = f" (did you mean {source.rstrip('/')}/model/ ?)"
        except StorageError:
            pass
        raise ModelSourceError(
            f"incomplete checkpoint at {source}: no _COMPLETE marker, the stage has not finished writing it{hint}: "
            f"{exc}"
        ) from exc
    except StorageError as exc:
        raise ModelSourceError(f"cannot download the model from {source}: {exc}") from exc
    check_hf_model_dir(target)
    return target
