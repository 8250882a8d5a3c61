"""Every check of a pipeline spec that needs no GPU, no download and no cluster, as one pure function.

``preflight(spec) -> list[Problem]`` runs in the operator's reconcile (a problem is ``InvalidSpec``: no Job is
created and nothing is retried until the spec changes), in ``kuberlhf run`` / ``kuberlhf train`` (``--emit``
too) before anything starts, and in ``kuberlhf stage`` before any worker starts. Schema errors (types, ranges,
unknown fields) are the spec models' business and come earlier, from ``parse_spec``.

The checks, in order (:data:`CHECKS`):

- the cross-field rules of :mod:`kuberlhf.contract.rules` (the CRD carries the same rules in CEL);
- the DeepSpeed config builder's combination checks for every trained model of every stage, on the resolved
  (preset-filled) settings and the stage's world size (:func:`kuberlhf.training.ds_config.settings_problems`);
- the memory plan (:mod:`kuberlhf.planner`): a stage whose per-GPU estimate exceeds ``spec.gpuMemory`` does not
  fit; the problem names the estimate and the cheapest fix (model shapes from config.json files only where no
  download is needed: the tiny model, the known OPT configs, local directories with ``local=True``);
- the Kubernetes quantities the operator copies into its pods (``resources``, ``shmSize``);
- ``stages.grpo.rewardFunction`` (imported where the stage would run it: ``local=True``);
- references resolvable without downloading: built-in dataset and model names, dataset adapters, the shape of
  ``s3://`` / ``file://`` URIs, and with ``local=True`` (the machine that reads them) that local files exist.

Adding a check: write ``def my_check(spec, options) -> Iterable[Problem]`` and pass
``checks=(*CHECKS, my_check)`` or add it to :data:`CHECKS`; every caller then runs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kuberlhf.contract.spec import DatasetRef, ModelRef, PipelineSpec


@dataclass(frozen=True)
class Problem:
    """One reason the spec cannot run: the manifest field, what is wrong, and what to change."""

    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}; fix: {self.fix}"


@dataclass(frozen=True)
class PreflightOptions:
    # True where the pipeline's local paths are read (``kuberlhf run``, a stage process): they must exist here.
    # The operator passes False: a local path there names a file inside the pods (a mounted volume).
    local: bool = False


Check = Callable[["PipelineSpec", PreflightOptions], Iterable[Problem]]


class PreflightError(ValueError):
    """A spec that validates but cannot run; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: Sequence[Problem]) -> str:
    head = "the RLHFPipeline spec cannot run:"
    if len(problems) == 1:
        return f"{head} {problems[0]}"
    return head + "\n" + "\n".join(f"  {p}" for p in problems)


# --- the checks ------------------------------------------------------------------------------------------------


def rule_problems(spec: PipelineSpec, options: PreflightOptions) -> Iterable[Problem]:
    from kuberlhf.contract.rules import RULES

    return [Problem(r.field, r.message, r.fix) for r in RULES if not r.ok(spec)]


def world_size(spec: PipelineSpec, stage: str) -> int:
    st = spec.stages.get(stage)
    return int(st.nodes) * int(st.gpus_per_node)  # both filled by the deploymentType preset


def deepspeed_problems(spec: PipelineSpec, options: PreflightOptions) -> Iterable[Problem]:
    from kuberlhf.training.ds_config import settings_problems, stage_settings

    out: list[Problem] = []
    roles_of = {"ppo": ("actor", "critic"), "grpo": ("actor",) if spec.stages.grpo.reward_function else
                ("actor", "reward")}
    for stage in (st.value for st in spec.stage_graph):
        for role in roles_of.get(stage, (None,)):
            for p in settings_problems(stage_settings(spec, stage, world_size(spec, stage), role=role)):
                if p not in out:  # actor and critic share most stage fields
                    out.append(p)
    return out


# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting and ending alphanumeric.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def uri_problem(uri: str, field: str, what: str, need_key: bool = True) -> Problem | None:
    """A malformed s3:// or file:// URI (no bucket, a bad bucket name, no object key when ``need_key``, a relative
    file path, another scheme); None for a good URI or a plain path."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket):
            return Problem(
                field,
                f"{uri!r} has no valid bucket name (3-63 lowercase letters, digits, '.' or '-')",
                f"write s3://<bucket>/<key of the {what}>",
            )
        if need_key and not key.strip("/"):
            return Problem(field, f"{uri!r} names a bucket but no object", f"write s3://{bucket}/<key of the {what}>")
        return None
    if uri.startswith("file://") and not uri[len("file://") :].startswith("/"):
        return Problem(field, f"{uri!r} is not an absolute file URI", "write file:///absolute/path")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", uri) and not uri.startswith(("s3://", "file://")):
        return Problem(field, f"{uri!r} is not an s3:// or file:// URI", "use s3://bucket/key, file:///path or a path")
    return None


def _dataset_problems(ref: DatasetRef, field: str, options: PreflightOptions) -> list[Problem]:
    from kuberlhf.data.adapters import ADAPTERS, known_names
    from kuberlhf.data.builtins import BUILTIN_PREFIX, BUILTINS

    out: list[Problem] = []
    if ref.adapter is not None and ref.adapter.strip().lower() not in ADAPTERS:
        out.append(
            Problem(
                f"{field}.adapter",
                f"unknown dataset adapter {ref.adapter!r}",
                f"use one of {', '.join(known_names())}, or leave it unset",
            )
        )
    if ref.name is not None:
        name = ref.name.strip()
        if name.lower().startswith(BUILTIN_PREFIX) and name.lower() not in BUILTINS:
            out.append(
                Problem(
                    f"{field}.name",
                    f"unknown built-in dataset {name!r}",
                    f"use one of {', '.join(sorted(BUILTINS))}, a hub name or a path",
                )
            )
        elif "://" in name or name.startswith("s3:"):
            out.append(
                Problem(
                    f"{field}.name",
                    f"{name!r} looks like a URI, not a hub dataset name",
                    "give it as path: s3://bucket/key (or file:///path)",
                )
            )
        elif name.count("/") > 1 or any(c.isspace() for c in name):
            out.append(
                Problem(
                    f"{field}.name",
                    f"{name!r} is not a hub dataset name (name or org/name)",
                    f"give a hub name like Dahoas/rm-static, or a file or directory as path (e.g. ./{name})",
                )
            )
        return out
    path = ref.path or ""
    bad = uri_problem(path, f"{field}.path", "dataset")
    if bad:
        return [*out, bad]
    if options.local and not path.startswith("s3://"):
        local = os.path.expanduser(path[len("file://") :] if path.startswith("file://") else path)
        if not os.path.exists(local):
            out.append(
                Problem(
                    f"{field}.path",
                    f"{path!r} does not exist on this machine (looked in {os.getcwd()})",
                    "fix the path (relative paths are read from the directory you run in) or use an s3:// URI",
                )
            )
    return out


def _model_problems(ref: ModelRef, field: str, options: PreflightOptions) -> list[Problem]:
    from kuberlhf.models.loading import is_hub_name
    from kuberlhf.models.tiny import TINY_MODEL_NAME

    out: list[Problem] = []
    if ref.revision is not None and not is_hub_name(ref.model):
        out.append(
            Problem(
                f"{field}.revision",
                f"a revision selects a version of a hub model, and {field}.model "
                f"{ref.model!r} is a local directory, a URI or built in",
                f"remove {field}.revision, or give a hub name (org/name) as {field}.model",
            )
        )
    for attr in ("model", "tokenizer"):
        source = getattr(ref, attr)
        if source is None or source == TINY_MODEL_NAME:
            continue
        where = f"{field}.{attr}"
        bad = uri_problem(source, where, "model directory")
        if bad:
            out.append(bad)
        elif source.startswith("kuberlhf/"):
            out.append(
                Problem(
                    where,
                    f"unknown built-in model {source!r}",
                    f"use {TINY_MODEL_NAME}, a hub name, a local directory or an s3:// URI",
                )
            )
        elif options.local and not source.startswith(("s3://", "file://")):
            from kuberlhf.models.loading import ModelError, resolve_local

            try:
                resolve_local(source, where)
            except ModelError as e:
                out.append(
                    Problem(
                        where,
                        str(e).split(": ", 1)[-1],
                        "give an existing Hugging Face model directory, a hub name or an s3:// URI",
                    )
                )
    return out


def reference_problems(spec: PipelineSpec, options: PreflightOptions) -> Iterable[Problem]:
    out: list[Problem] = []
    refs = [(ref, f"spec.data.datasets[{i}]") for i, ref in enumerate(spec.data.datasets)]
    refs += [(ref, f"spec.data.sftOnly[{i}]") for i, ref in enumerate(spec.data.sft_only)]
    if spec.data.unsupervised is not None:
        refs.append((spec.data.unsupervised, "spec.data.unsupervised"))
    for ref, field in refs:
        out += _dataset_problems(ref, field, options)
    out += _model_problems(spec.actor, "spec.actor", options)
    if spec.reward is not None:
        out += _model_problems(spec.reward, "spec.reward", options)
    bad = uri_problem(spec.storage.uri, "spec.storage.uri", "pipelines", need_key=False)  # a whole bucket is fine
    return [*out, *([bad] if bad else [])]


# A Kubernetes resource.Quantity: a signed decimal number and a binary-SI, decimal-SI or exponent suffix. A value
# outside it is a 400 from the API server on the Job or Deployment (naming no field), so it is caught here.
QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")


def _quantity_problem(value: object, field: str) -> Problem | None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or QUANTITY.match(str(value))):
        return Problem(field, f"{value!r} is not a Kubernetes quantity",
                       "write a number with an optional unit, e.g. 8Gi, 512Mi, 2, 500m")
    return None


def resource_problems(spec: PipelineSpec, options: PreflightOptions) -> Iterable[Problem]:
    """Quantities the operator copies into its pods (``resources`` of every stage and of serving, ``shmSize``)."""
    from kuberlhf.contract.spec import STAGE_ORDER

    found = [_quantity_problem(spec.shm_size, "spec.shmSize")]
    owners = [(f"spec.stages.{st.value}", spec.stages.get(st).resources) for st in STAGE_ORDER]
    owners.append(("spec.serving", spec.serving.resources))
    for at, resources in owners:
        for kind in ("limits", "requests"):
            amounts = resources.get(kind)
            if amounts is None:
                continue
            if not isinstance(amounts, dict):
                found.append(Problem(f"{at}.resources.{kind}", "must be a map of resource name to quantity",
                                     "write e.g. {cpu: 4, memory: 32Gi}"))
                continue
            found += [_quantity_problem(v, f"{at}.resources.{kind}.{k}") for k, v in amounts.items()]
    return [p for p in found if p is not None]


def memory_problems(spec: PipelineSpec, options: PreflightOptions) -> Iterable[Problem]:
    from kuberlhf.planner.check import memory_problems as plan_check

    return plan_check(spec, options)


def reward_function_problems(spec: PipelineSpec, options: PreflightOptions) -> Iterable[Problem]:
    """``stages.grpo.rewardFunction``: the shape of a file reference everywhere; with ``local=True`` (the machine
    that runs it) that it imports and names a function. The operator's image need not hold the user's module, so
    there the stage itself refuses it before loading any model (a user error, never retried)."""
    from kuberlhf.rlhf.code_reward import reward_function_problem

    ref = spec.stages.grpo.reward_function
    if not ref or spec.algorithm.value != "grpo":
        return []
    found = reward_function_problem(ref, spec.storage, local=options.local)
    return [Problem("spec.stages.grpo.rewardFunction", *found)] if found else []


CHECKS: tuple[Check, ...] = (rule_problems, deepspeed_problems, reference_problems, resource_problems,
                             reward_function_problems,
                             memory_problems)


def preflight(spec: PipelineSpec, *, local: bool = False, checks: Sequence[Check] = CHECKS) -> list[Problem]:
    """Every problem of ``spec`` (a validated PipelineSpec) that can be found here, without a GPU or a download.
    Empty when the spec can run. ``local``: see :class:`PreflightOptions`."""
    options = PreflightOptions(local=local)
    problems: list[Problem] = []
    for check in checks:
        problems += [p for p in check(spec, options) if p not in problems]
    return problems


def check_spec(spec: PipelineSpec, *, local: bool = False, checks: Sequence[Check] = CHECKS) -> None:
    """Raise :class:`PreflightError` listing every problem of ``spec``."""
    problems = preflight(spec, local=local, checks=checks)
    if problems:
        raise PreflightError(problems)
