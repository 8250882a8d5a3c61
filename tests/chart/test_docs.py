"""docs/kubernetes.md stays in step with the spec models and the chart."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from kuberlhf.contract import spec as S

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "kubernetes.md").read_text()


def _fields(model: type[BaseModel]) -> set[str]:
    return {to_camel(name) for name in model.model_fields}


def test_field_table_lists_every_spec_field() -> None:
    expected = {
        "spec.": _fields(S.PipelineSpec) - {"actor", "reward", "data", "storage", "stages", "podTemplate", "serving"},
        "spec.actor.": _fields(S.ModelRef),
        "spec.data.": _fields(S.DataSpec) - {"datasets"},
        "spec.storage.": _fields(S.StorageSpec),
        "spec.stages.<stage>.": _fields(S.CommonStageSpec),
        "spec.stages.ppo.": _fields(S.PPOStageSpec) - _fields(S.CommonStageSpec),
        "spec.podTemplate.": _fields(S.PodTemplate),
        "spec.serving.": _fields(S.ServingSpec),
    }
    missing = [f"{prefix}{f}" for prefix, fields in expected.items() for f in sorted(fields)
               if f"`{prefix}{f}`" not in DOC]
    missing += [f for f in ("zeroStage", "lora", "maskPrompt") if f"{f}`" not in DOC]
    assert not missing, f"docs/kubernetes.md field table lacks {missing}"


def test_doc_commands_use_files_that_exist() -> None:
    for path in ("hack/kind-e2e.sh", "hack/kind-values.yaml", "hack/helm.sh", "examples/s3-secret.yaml",
                 "examples/tiny-cpu.yaml", "examples/opt-13b-single-node.yaml", "crds/rlhfpipelines.yaml",
                 "charts/kuberlhf"):
        assert path in DOC and (REPO / path).exists(), path
