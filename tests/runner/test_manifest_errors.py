"""A malformed manifest: exit code 2, an error naming the field (or file), and nothing runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]


def tiny_doc() -> dict:
    return yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())


def run_cli(*args: str):
    from kuberlhf.cli import app

    return CliRunner().invoke(app, ["run", *args])


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"]["stages"]["sft"].update({"learningRat": 1e-3}),
     ["spec.stages.sft.learningRat", "unknown field"]),
    (lambda d: d["spec"].pop("storage"), ["spec.storage", "required field is missing"]),
    (lambda d: d["spec"]["data"].update({"split": "2,4"}), ["spec.data.split", "three"]),
    (lambda d: d["spec"]["stages"]["ppo"].update({"klCoef": -1}), ["spec.stages.ppo.klCoef"]),
    (lambda d: d["metadata"].update({"name": "Tiny_CPU"}), ["metadata.name"]),
    # validates, but cannot run: the preflight refuses it before the object store or any stage starts
    (lambda d: d["spec"]["data"].update({"datasets": ["./no-such-pairs.jsonl"]}),
     ["spec.data.datasets[0].path", "does not exist"]),
    (lambda d: d["spec"]["stages"]["sft"].update({"dtype": "fp16"}), ["spec.stages.sft.dtype", "fix:"]),
])
def test_bad_field_is_named_and_nothing_runs(tmp_path: Path, mutate, expected: list[str]) -> None:
    doc = tiny_doc()
    mutate(doc)
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    res = run_cli(str(manifest), "--output-dir", str(out))
    assert res.exit_code == 2, res.output
    for text in expected:
        assert text in res.stderr
    assert str(manifest) in res.stderr and "nothing was run" in res.stderr
    assert not out.exists()  # no output dir, so no object store was started and no stage ran


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: kuberlhf.io/v1alpha1\nspec: [unclosed\n")
    res = run_cli(str(bad), "--output-dir", str(tmp_path / "out"))
    assert res.exit_code == 2 and "not valid YAML" in res.stderr
    res = run_cli(str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path / "out"))
    assert res.exit_code == 2 and "cannot read pipeline manifest" in res.stderr
    assert not (tmp_path / "out").exists()


def test_the_tiny_example_is_valid_and_cpu_sized() -> None:
    from kuberlhf.contract.spec import load_pipeline_file

    p = load_pipeline_file(str(REPO / "examples" / "tiny-cpu.yaml"))
    assert p.spec.accelerator.value == "cpu"
    assert p.spec.actor.model == "kuberlhf/tiny-opt" and p.spec.reward_from_sft  # the RM starts from SFT's model
    assert p.spec.stages.ppo.ema.enabled and p.spec.data.unsupervised is not None and p.spec.stages.ppo.ptx_coef > 0
    assert p.spec.stages.ppo.hybrid_engine is False
    assert p.spec.stages.ppo.checkpoint_every_steps > 0  # the resume test kills PPO after its first checkpoint
    for stage in ("sft", "reward"):
        lora = p.spec.stages.get(stage).lora
        assert lora is None or lora.dim == 0
