"""Where a model comes from: a hub name, a local directory, the built-in ``kuberlhf/tiny-opt``, or an
``s3://`` / ``file://`` URI in the object store (downloaded, verified, then loaded from the local copy).

Errors name the manifest field (``spec.actor.model``, ``spec.reward.model``) and the fix.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from kuberlhf.models.tiny import TINY_ASSETS, TINY_MODEL_NAME, tiny_causal_lm


class ModelError(ValueError):
    """A model or tokenizer that cannot be found or loaded; the message names the spec field."""


_URI_PREFIXES = ("s3://", "file://")
_PATH_PREFIXES = ("/", "./", "../", "~")


def is_tiny(source: str) -> bool:
    return source == TINY_MODEL_NAME


def is_uri(source: str) -> bool:
    return source.startswith(_URI_PREFIXES)


def is_hub_name(source: str) -> bool:
    """"name" or "org/name" that is not a path, a URI or the built-in tiny model: what a hub revision applies to."""
    return not (is_tiny(source) or is_uri(source) or source.startswith(_PATH_PREFIXES) or source.count("/") > 1)


def model_cache_dir() -> Path:
    return Path(os.environ.get("KUBERLHF_CACHE", Path.home() / ".cache" / "kuberlhf")) / "models"


def fetch_model(uri: str, storage: Any = None, field: str = "spec.actor.model", dest: Path | None = None) -> Path:
    """Download a model directory from the object store into the local cache (verified; files already there
    and intact are skipped) and return the local directory."""
    from kuberlhf.storage import IncompleteCheckpointError, ObjectStore, StorageError

    dest = dest or model_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    endpoint = getattr(storage, "endpoint", None) if storage is not None else None
    try:
        store = ObjectStore.from_uri(uri, endpoint=endpoint)
        store.download_dir(uri, str(dest))
    except IncompleteCheckpointError as e:
        raise ModelError(f"{field}={uri}: the model has no _COMPLETE marker (its writer did not finish): {e}") from e
    except StorageError as e:
        raise ModelError(f"{field}={uri}: cannot download the model: {e}") from e
    return dest


def resolve_local(source: str, field: str) -> str:
    """A path-like source that must exist locally, or a hub name (returned unchanged)."""
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ModelError(f"{field}={source}: the directory has no config.json; point it at a Hugging Face "
                             "model directory (config.json, weights, tokenizer files)")
        return expanded
    # hub names are "name" or "org/name"; anything else path-like is a local path that is missing
    if source.startswith(_PATH_PREFIXES) or source.count("/") > 1 or os.path.exists(expanded):
        raise ModelError(f"{field}={source}: the local path does not exist; fix the path, or give a hub name "
                         f"(e.g. facebook/opt-350m), an s3:// URI or {TINY_MODEL_NAME}")
    return source


def _hub_error(source: str, field: str, err: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else str(err)
    return ModelError(f"{field}={source}: cannot load this model: {why}. Give a local model directory, an s3:// "
                      f"URI, a hub name reachable from the pod, or {TINY_MODEL_NAME}")


def load_tokenizer(source: str, field: str = "spec.actor.model", padding_side: str = "right",
                   revision: str | None = None):
    """The tokenizer of a model (local dir, hub name or tiny); guarantees a pad token. ``revision``: the hub
    revision (branch, tag or commit) of a hub name."""
    from transformers import AutoTokenizer

    path = str(TINY_ASSETS) if is_tiny(source) else resolve_local(source, field)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(source, field, e) from e
    if tok.pad_token is None:
        # GPT-2-like tokenizers have no pad token; the EOS token is the conventional stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def apply_dropout(config: Any, dropout: float | None) -> None:
    """Set every dropout probability of a config (DeepSpeed-Chat's --disable_dropout is dropout=0)."""
    if dropout is None:
        return
    for key in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_pdrop",
                "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(config, key):
            setattr(config, key, dropout)


def load_pretrained(auto_cls: Any, path: str, source: str, field: str, dropout: float | None,
                    revision: str | None = None) -> Any:
    """``auto_cls.from_pretrained(path, revision=...)`` in fp32 with the dropout override; a failure names the spec
    field."""
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
        apply_dropout(config, dropout)
        return auto_cls.from_pretrained(path, config=config, dtype=torch.float32, revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(source, field, e) from e


def load_causal_lm(source: str, field: str = "spec.actor.model", seed: int = 1234, dropout: float | None = None,
                   gradient_checkpointing: bool = False, ds_config: dict[str, Any] | None = None,
                   tokenizer: Any = None, revision: str | None = None):
    """A causal LM in fp32 (DeepSpeed casts it to the configured precision). With a ZeRO-3 ``ds_config`` it is
    created partitioned across the ranks (``kuberlhf.models.partition``); ``tokenizer`` grows the embeddings to
    cover it (:func:`align_embeddings`) while the partitioning config is active; ``revision`` of a hub name."""
    from transformers import AutoModelForCausalLM

    from kuberlhf.models.partition import partitioned_loading

    with partitioned_loading(ds_config):
        if is_tiny(source):
            model = tiny_causal_lm(seed, dropout)
        else:
            model = load_pretrained(AutoModelForCausalLM, resolve_local(source, field), source, field, dropout,
                                    revision)
        if tokenizer is not None:
            align_embeddings(model, tokenizer)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def align_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the embedding matrix to a multiple of 8 covering the tokenizer (as DeepSpeed-Chat does)."""
    weight = model.get_input_embeddings().weight
    n = len(tokenizer)
    current = (weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape)[0]  # a ZeRO-3 placeholder is empty
    if n > current:
        model.resize_token_embeddings(int(8 * ((n + 7) // 8)))
