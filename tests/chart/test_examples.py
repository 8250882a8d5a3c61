"""Every file in examples/ is a valid RLHFPipeline (the spec models) or a valid Kubernetes object."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kuberlhf.contract.spec import parse_pipeline

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
K8S_VERSION = "1.30.0"


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(EXAMPLES.glob("*.y*ml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}#{i}", doc))
    return docs


DOCS = _documents()


def test_the_promised_examples_exist() -> None:
    names = {p.name for p in EXAMPLES.iterdir()}
    assert {"opt-1.3b-single-gpu.yaml", "opt-13b-single-node.yaml", "opt-66b-multi-node.yaml", "tiny-cpu.yaml",
            "s3-secret.yaml", "README.md"} <= names
    readme = (EXAMPLES / "README.md").read_text()
    for name in names - {"README.md"}:
        assert name in readme, f"examples/README.md does not describe {name}"


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=[n for n, _ in DOCS])
def test_example_is_valid(name: str, doc: dict) -> None:
    if doc.get("kind") == "RLHFPipeline":
        pipeline = parse_pipeline(doc)
        assert pipeline.spec.storage.secret_ref is not None, f"{name}: give spec.storage.secretRef"
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_referenced_secret_is_in_the_examples() -> None:
    secrets = {d["metadata"]["name"] for _, d in DOCS if d.get("kind") == "Secret"}
    for name, doc in DOCS:
        if doc.get("kind") == "RLHFPipeline":
            ref = parse_pipeline(doc).spec.storage.secret_ref
            assert ref is not None and ref.name in secrets, f"{name} references a Secret no example defines"
    secret = next(d for _, d in DOCS if d.get("kind") == "Secret")
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.mark.parametrize(
    ("file", "deployment", "nodes", "gpus", "zero"),
    [
        ("opt-1.3b-single-gpu.yaml", "single_gpu", 1, 1, 0),
        # ZeRO-3 as DeepSpeed-Chat's 13B scripts: at ZeRO-2 the memory planner needs ~104 GiB per GPU
        ("opt-13b-single-node.yaml", "single_node", 1, 8, 3),
        ("opt-66b-multi-node.yaml", "multi_node", 8, 8, 3),
    ],
)
def test_gpu_examples_follow_the_deepspeed_chat_recipes(file: str, deployment: str, nodes: int, gpus: int,
                                                         zero: int) -> None:
    spec = parse_pipeline((EXAMPLES / file).read_text()).spec
    assert spec.deployment_type.value == deployment and spec.accelerator.value == "cuda"
    assert spec.reward.model == "facebook/opt-350m"
    ppo = spec.stages.ppo
    assert (ppo.nodes, ppo.gpus_per_node, ppo.actor_zero_stage) == (nodes, gpus, zero)
    assert ppo.hybrid_engine is True and ppo.ema.enabled
    if deployment == "single_gpu":
        assert spec.actor.model == "facebook/opt-1.3b" and spec.stages.sft.lora and spec.stages.sft.lora.dim == 128
