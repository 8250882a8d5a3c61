"""A pipeline with two datasets and split "2,4,4": each stage gets its own, disjoint slice of each dataset
(through the same data layer the stage entrypoints use)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kuberlhf.contract.spec import STAGE_ORDER, load_pipeline_file

REPO = Path(__file__).resolve().parents[2]


def write_pairs(path: Path, tag: str, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{tag} question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n")


def test_two_datasets_split_244_disjoint_per_stage(tmp_path: Path) -> None:
    from kuberlhf.data.blend import stage_rows

    write_pairs(tmp_path / "a.jsonl", "alpha", 200)
    write_pairs(tmp_path / "b.jsonl", "beta", 100)
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    doc["spec"]["data"] = {"datasets": [str(tmp_path / "a.jsonl"), {"path": str(tmp_path / "b.jsonl")}],
                           "split": "2,4,4", "evalFraction": 0.1, "seed": 7}
    manifest = tmp_path / "two.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    pipeline = load_pipeline_file(str(manifest))

    seen: dict[str, set[str]] = {}
    for stage in STAGE_ORDER:
        train, ev = stage_rows(pipeline.spec.data, stage)
        prompts = list(train["prompt"]) + list(ev["prompt"])
        assert len(prompts) == len(set(prompts))
        seen[stage.value] = set(prompts)
        for tag, n in (("alpha", 200), ("beta", 100)):
            share = sum(f"{tag} question" in p for p in prompts) / n
            expected = 0.2 if stage.value == "sft" else 0.4
            assert abs(share - expected) < 0.02, (stage, tag, share)
        assert len(ev) > 0 and not set(ev["prompt"]) & set(train["prompt"])
    assert not seen["sft"] & seen["reward"]
    assert not seen["sft"] & seen["ppo"]
    assert not seen["reward"] & seen["ppo"]
    assert len(seen["sft"] | seen["reward"] | seen["ppo"]) == 300  # together they cover both datasets

    # the same manifest gives the same slices (every rank and node computes them alike)
    again, _ = stage_rows(load_pipeline_file(str(manifest)).spec.data, STAGE_ORDER[2])
    assert set(again["prompt"]) <= seen["ppo"]
