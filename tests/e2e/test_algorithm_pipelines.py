"""A dpo and a grpo pipeline through the operator on the real v1.20 control plane, side by side, each to a serving chat.

examples/tiny-cpu-dpo.yaml (sft -> dpo) and examples/tiny-cpu-grpo.yaml (sft -> grpo, answers scored by the reward
function the example names, ``kuberlhf.data.dialogues:on_subject``, so no reward stage) are applied as written,
except for the storage (the session's SeaweedFS), one CPU rank per stage and a step or two each (CI budget: the
stage tests train them for real). One chart install (the operator pod under the chart's ServiceAccount) watches
both; each stage is an Indexed Job of a real `kuberlhf stage` process, then the chat Deployment, which must serve
the last stage's model (dpo/model/; grpo/ema/, its EMA) and answer the official openai client. The two pipelines'
single-node stages run at the same time, each rendezvousing on 127.0.0.1:29500 in its own pod. Only the node is a
stand-in: the process kubelet (which gives each such pod its own local port)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import KubeREST, pipeline_report, wait_for

from kuberlhf_operator.manifests import chat_name, job_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/kuberlhf.io/v1alpha1"
ALGORITHMS = ("dpo", "grpo")
STEPS = {  # per stage: the fewest steps that still train, checkpoint-free (the stage tests cover resuming)
    "sft": {"maxSteps": 2, "perDeviceBatchSize": 4, "checkpointEverySteps": 0},
    "dpo": {"maxSteps": 2, "perDeviceBatchSize": 4, "checkpointEverySteps": 0},
    "grpo": {"maxSteps": 1, "perDeviceBatchSize": 4, "generationBatchSize": 2, "groupSize": 2, "maxAnswerLen": 8,
             "ptxCoef": 0.0, "checkpointEverySteps": 0},
}
SERVED = {"dpo": "/dpo/model", "grpo": "/grpo/ema"}  # dpo keeps no EMA; the grpo example keeps one


def _example(algorithm: str, storage: dict[str, Any]) -> dict[str, Any]:
    obj = yaml.safe_load((REPO / "examples" / f"tiny-cpu-{algorithm}.yaml").read_text())
    obj["metadata"] = {"name": algorithm}
    spec = obj["spec"]
    spec["storage"] = storage
    spec["data"]["maxSamples"] = 128
    for stage, values in spec["stages"].items():
        values.update(gpusPerNode=1, resources={}, **STEPS[stage])
    spec["serving"].update(maxNewTokens=8, resources={})
    return obj


def test_dpo_and_grpo_pipelines_run_through_the_operator_to_a_serving_chat(control_plane, kubelet,
                                                                           tiny_pipeline_setup):
    from openai import OpenAI

    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    with tiny_pipeline_setup("alg") as (op_ns, ns, tiny, _):
        paths = {a: f"{GROUP_PATH}/namespaces/{ns}/rlhfpipelines/{a}" for a in ALGORITHMS}
        docs = [_example(a, tiny["spec"]["storage"]) for a in ALGORITHMS]
        control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))
        for algorithm, path in paths.items():
            wait_for(lambda p=path: (api.get(p).get("status") or {}).get("phase") in ("Succeeded", "Failed"),
                     f"the {algorithm} pipeline to finish", 600, 1.0,
                     describe=lambda p=path: pipeline_report(api, kubelet, op_ns, ns, p))
        status = {a: api.get(p)["status"] for a, p in paths.items()}
        assert {a: (s["phase"], s["stage"]) for a, s in status.items()} == {
            "dpo": ("Succeeded", "done"), "grpo": ("Succeeded", "done")}, status
        # the stage graph each algorithm runs: dpo has no reward stage, nor grpo with a reward function
        assert status["dpo"]["graph"] == "sft -> dpo" and status["grpo"]["graph"] == "sft -> grpo"
        for algorithm, st in status.items():
            assert set(st["stages"]) == {"sft", algorithm, "serving"}, st["stages"]
            assert st["stages"][algorithm]["checkpoint"].endswith(f"/{algorithm}"), st["stages"]
            conditions = {c["type"]: c["status"] for c in st["conditions"]}
            assert conditions[f"{algorithm.upper()}Succeeded"] == "True" and conditions["Serving"] == "True", st
        # one attempt per stage: the two pipelines' concurrent single-node stages did not collide
        jobs = api.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
        assert sorted(j["metadata"]["name"] for j in jobs) == sorted(
            job_name(a, s, 1) for a in ALGORITHMS for s in ("sft", a))
        rows = control_plane.kubectl("get", "rlhf", "-n", ns, "-o", "wide").stdout.splitlines()
        assert "ALGORITHM" in rows[0] and "GRAPH" in rows[0], rows
        assert sorted(r.split()[:2] for r in rows[1:]) == [["dpo", "dpo"], ["grpo", "grpo"]], rows

        # each chat serves its last stage's model (grpo: the EMA) and answers the official client
        for algorithm in ALGORITHMS:
            chat = api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{chat_name(algorithm)}")
            command = chat["spec"]["template"]["spec"]["containers"][0]["command"]
            assert command[command.index("--model") + 1].endswith(SERVED[algorithm]), command
            url = wait_for(lambda a=algorithm: kubelet.service_url(ns, chat_name(a)), f"a Ready {algorithm} chat", 90)
            secret = api.get(f"/api/v1/namespaces/{ns}/secrets/{status[algorithm]['chatApiKeySecret']}")
            client = OpenAI(base_url=f"{url}/v1", api_key=base64.b64decode(secret["data"]["API_KEY"]).decode(),
                            timeout=60, max_retries=0)
            reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=8,
                                                   messages=[{"role": "user", "content": "Tell me about cats."}])
            assert reply.choices[0].message.role == "assistant", reply
            assert isinstance(reply.choices[0].message.content, str) and 0 < reply.usage.completion_tokens <= 8
