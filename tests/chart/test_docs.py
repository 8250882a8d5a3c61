"""docs/kubernetes.md stays in step with the spec models and the chart."""

from __future__ import annotations

from pathlib import Path

from pydantic.alias_generators import to_camel

from kuberlhf.contract import spec as S
from kuberlhf_operator.fields_doc import field_rows, replace_table

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "kubernetes.md").read_text()


def test_field_table_is_the_generator_output() -> None:
    """The table is generated from the spec models, never kept by hand."""
    assert replace_table(DOC) == DOC, "regenerate: python -m kuberlhf_operator.fields_doc --write docs/kubernetes.md"


def test_field_table_covers_every_field_with_its_default() -> None:
    rows = {path: (default, meaning) for path, default, meaning in field_rows()}
    assert rows["spec.stages.{ppo,grpo}.ptxCoef"][0] == "`27.8`" and rows["spec.stages.grpo.klCoef"][0] == "`0.04`" and rows["spec.stages.<stage>.nodes"][0] == "preset"
    assert rows["spec.stages.{sft,reward}.zeroStage"][0] == "preset" and rows["spec.actor.model"][0] == "required"
    assert "spec.stages.<stage>.extraArgs" not in rows and "from_pretrained" in rows["spec.actor.revision"][1]
    concrete = set()
    for path in rows:  # spec.stages.<stage>.x / spec.stages.{sft,reward}.x -> one path per stage
        head, sep, tail = path.partition("spec.stages.")
        stage, _, rest = tail.partition(".")
        stages = ("sft", "reward", "ppo", "dpo", "grpo") if stage == "<stage>" else stage.strip("{}").split(",")
        concrete |= {f"spec.stages.{s}.{rest}" for s in stages} if sep else {path}
    for prefix, model in (("spec.stages.sft.", S.SFTStageSpec), ("spec.stages.reward.", S.RewardStageSpec),
                          ("spec.stages.ppo.", S.PPOStageSpec), ("spec.stages.dpo.", S.DPOStageSpec),
                          ("spec.stages.grpo.", S.GRPOStageSpec), ("spec.serving.", S.ServingSpec),
                          ("spec.data.", S.DataSpec), ("spec.storage.", S.StorageSpec), ("spec.actor.", S.ModelRef)):
        for name in model.model_fields:
            path = prefix + to_camel(name)
            assert path in concrete or any(p.startswith(path + ".") for p in concrete), f"no row for {path}"


def test_doc_commands_use_files_that_exist() -> None:
    for path in ("hack/kind-e2e.sh", "hack/kind-values.yaml", "hack/helm.sh", "examples/s3-secret.yaml",
                 "examples/tiny-cpu.yaml", "examples/opt-13b-single-node.yaml", "crds/rlhfpipelines.yaml",
                 "charts/kuberlhf"):
        assert path in DOC and (REPO / path).exists(), path
