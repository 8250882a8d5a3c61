"""Node scratch of local runs: two runs never share a folder, whatever their pipelines' names, uids and stores."""

from __future__ import annotations

from pathlib import Path

from kuberlhf.contract.spec import load_pipeline_file
from kuberlhf.contract.stage import ENV_WORK_DIR, Stage, StageLayout
from kuberlhf.runner.local import node_envs, run_id_for
from kuberlhf.stages.runtime import scratch_dir, work_root

REPO = Path(__file__).resolve().parents[2]


def _scratch(out: Path, endpoint: str) -> list[Path]:
    """The scratch folders the nodes of a run's sft stage would use (what StageRun computes from its env)."""
    pipeline = load_pipeline_file(str(REPO / "examples" / "tiny-cpu.yaml"))
    pipeline = pipeline.model_copy(update={"metadata": pipeline.metadata.model_copy(update={"uid": "fixed-uid"})})
    run_id = run_id_for(pipeline, out)
    uri = StageLayout.for_pipeline(pipeline, "local", run_id).stage_uri(Stage.sft)
    envs = node_envs(pipeline, Stage.sft, "local", run_id, 0, {}, out, 29500)
    return [
        scratch_dir(work_root(env), pipeline.metadata.name, "sft", uri, endpoint, int(env["NODE_RANK"])) for env in envs
    ]


def test_two_runs_of_one_manifest_never_share_scratch(tmp_path: Path) -> None:
    # same name, same uid (so the same stage URI), each on its own embedded store: before, both keyed their
    # scratch by name + URI under $KUBERLHF_CACHE/work and met in one folder
    first = _scratch(tmp_path / "a", "http://127.0.0.1:40001")
    second = _scratch(tmp_path / "b", "http://127.0.0.1:40002")
    assert not set(first) & set(second)
    assert all(p.is_relative_to(tmp_path / "a") for p in first)
    # a re-run into the same directory is the same run: it finds its own scratch again (ports change per run)
    assert _scratch(tmp_path / "a", "http://127.0.0.1:40001") == first


def test_scratch_key_names_the_store_and_the_fallback_root_is_the_cache(tmp_path: Path) -> None:
    uri = "s3://bucket/ns/p/uid/sft"
    one = scratch_dir(tmp_path, "p", "sft", uri, "http://127.0.0.1:1", 0)
    assert one != scratch_dir(tmp_path, "p", "sft", uri, "http://127.0.0.1:2", 0)  # another store, same URI
    assert one == scratch_dir(tmp_path, "p", "sft", uri, "http://127.0.0.1:1", 0)
    assert one.parent != scratch_dir(tmp_path, "p", "sft", uri + "x", "http://127.0.0.1:1", 0).parent
    assert one.name == "node0" and scratch_dir(tmp_path, "p", "sft", uri, None, 1).name == "node1"
    assert work_root({"KUBERLHF_CACHE": str(tmp_path)}) == tmp_path / "work"  # a pod: its own scratch volume
    assert work_root({ENV_WORK_DIR: str(tmp_path / "w"), "KUBERLHF_CACHE": "/x"}) == tmp_path / "w"
