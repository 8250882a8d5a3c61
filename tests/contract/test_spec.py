"""The RLHFPipeline spec models: defaults, presets, coercions and field-named errors."""

from __future__ import annotations

import pytest

from kuberlhf.contract.presets import PRESETS
from kuberlhf.contract.spec import DatasetRef, SpecError, parse_pipeline, parse_split

BASE = """
apiVersion: kuberlhf.io/v1alpha1
kind: RLHFPipeline
metadata: {name: demo}
spec:
  actor: {model: facebook/opt-1.3b}
  reward: {model: facebook/opt-350m}
  data: {datasets: [Dahoas/rm-static, ./data/pairs.jsonl, {path: s3://b/x.parquet}]}
  storage: {uri: s3://bucket/prefix}
"""


def test_defaults_and_preset_fill():
    p = parse_pipeline(BASE)
    sft, ppo = p.spec.stages.sft, p.spec.stages.ppo
    assert p.spec.deployment_type.value == "single_gpu"
    assert sft.zero_stage == 0 and sft.gradient_accumulation_steps == 8 and sft.lora.dim == 128
    assert ppo.actor_zero_stage == 0 and ppo.hybrid_engine is True and ppo.actor_lora.dim == 128
    assert ppo.ema.enabled and ppo.ema.beta == 0.992 and ppo.ptx_coef == 27.8 and ppo.lam == 0.95
    assert p.spec.data.split_weights == (0.2, 0.4, 0.4)


def test_user_values_beat_presets():
    p = parse_pipeline(BASE + "  deploymentType: single_node\n  stages: {sft: {zeroStage: 3, gpusPerNode: 4}}\n")
    assert p.spec.stages.sft.zero_stage == 3
    assert p.spec.stages.sft.gpus_per_node == 4
    assert p.spec.stages.reward.gpus_per_node == PRESETS["single_node"]["reward"]["gpus_per_node"]


def test_cpu_turns_hybrid_engine_preset_off():
    p = parse_pipeline(BASE + "  accelerator: cpu\n")
    assert p.spec.stages.ppo.hybrid_engine is False


def test_dataset_strings_become_names_or_paths():
    ds = parse_pipeline(BASE).spec.data.datasets
    assert ds[0] == DatasetRef(name="Dahoas/rm-static")
    assert ds[1] == DatasetRef(path="./data/pairs.jsonl")
    assert ds[2].path == "s3://b/x.parquet"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        (("]}", "], split: '1,2'}"), "spec.data.split"),
        (("storage: {uri: s3://bucket/prefix}", "storage: {uri: bucket}"), "spec.storage.uri"),
        (("storage: {uri: s3://bucket/prefix}", "storage: {uri: s3://b, endpont: x}"), "spec.storage.endpont"),
        (("actor: {model: facebook/opt-1.3b}", "actor: {model: ''}"), "spec.actor.model"),
        (("metadata: {name: demo}", "metadata: {name: Demo_1}"), "metadata.name"),
    ],
)
def test_errors_name_the_field(patch, field):
    with pytest.raises(SpecError) as err:
        parse_pipeline(BASE.replace(*patch))
    assert field in str(err.value)


def test_unknown_deployment_type_and_negative_nodes():
    with pytest.raises(SpecError, match=r"spec.deploymentType"):
        parse_pipeline(BASE + "  deploymentType: huge\n")
    with pytest.raises(SpecError, match=r"spec.stages.sft.nodes"):
        parse_pipeline(BASE + "  stages: {sft: {nodes: -1}}\n")


def test_missing_storage_is_named():
    with pytest.raises(SpecError, match=r"spec.storage: required field is missing"):
        parse_pipeline(BASE.replace("  storage: {uri: s3://bucket/prefix}\n", ""))


def test_dataset_ref_needs_exactly_one_source():
    with pytest.raises(SpecError, match="exactly one of 'name'"):
        parse_pipeline(BASE.replace("{path: s3://b/x.parquet}", "{name: a, path: b}"))


@pytest.mark.parametrize("bad", ["1,2", "a,b,c", "0,0,0", "-1,1,1"])
def test_parse_split_rejects(bad):
    with pytest.raises(ValueError, match="split"):
        parse_split(bad)


def test_wire_round_trip():
    p = parse_pipeline(BASE)
    again = parse_pipeline(p.to_wire())
    assert again == p


def test_removed_extra_args_says_what_to_do_instead():
    doc = {"metadata": {"name": "p"}, "spec": {"actor": {"model": "a"}, "reward": {"model": "b"},
                                               "data": {"datasets": ["kuberlhf/synthetic-pairs"]},
                                               "storage": {"uri": "s3://b/p"}, "stages": {"sft": {"extraArgs": []}}}}
    with pytest.raises(SpecError, match=r"spec.stages.sft.extraArgs: removed: it never reached the stage"):
        parse_pipeline(doc)


def test_a_json_manifest_parses_as_its_yaml_does() -> None:
    """parse_pipeline reads JSON text with the json module (the stage Jobs' KUBERLHF_PIPELINE), YAML otherwise."""
    import json
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "examples" / "tiny-cpu.yaml").read_text()
    as_json = json.dumps(yaml.safe_load(text))
    assert parse_pipeline(as_json) == parse_pipeline(text)
