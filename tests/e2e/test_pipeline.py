"""The tiny pipeline end to end on the real control plane, run ONCE and asserted by several tests.

Real pieces: kube-apiserver + kube-controller-manager v1.20.2 (Job, Deployment, ReplicaSet, GC controllers), the
chart's operator Deployment (run by the process kubelet under the chart's ServiceAccount token, so the rendered
RBAC is what it has), real `kuberlhf stage` processes writing checkpoints to the session's SeaweedFS S3, and the
chat Deployment's real `kuberlhf serve` answered by the official openai client. Only the node is a stand-in: the
process kubelet (tests/harness/process_kubelet.py documents its substitutions).

The pipeline's pods select a node label the process kubelet's node lacks at first, so the run starts Pending
(unschedulable, with the scheduler's message and an Event) until the test labels the node, as a GPU pool that
scales up would. Step 3 runs at ZeRO-3 as
one Indexed Job of 2 pods (one CPU rank each, rendezvous at ``<job>-0.<svc>``). During the one run the test also
injects faults: it kills the operator mid-stage and again at the sft -> reward
boundary, and it kills the sft pod's process right after its first checkpoint was committed.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import KubeREST, wait_for

from kuberlhf_operator import LABEL_PIPELINE
from kuberlhf_operator.manifests import (
    QUEUE_NAME_LABEL,
    chat_name,
    generated_api_key_secret_name,
    job_held,
    job_name,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NAME = "tiny"
OPERATOR_NS = "kuberlhf-system"
GROUP_PATH = "/apis/kuberlhf.io/v1alpha1"
RUN_TIMEOUT = 720
GPU_POOL_LABEL = "kuberlhf.io/e2e-gpu-pool"
HF_TOKEN = "hf_e2e_not_a_real_token"
# A Kueue LocalQueue name. No Kueue can run here (1.20 has no Job.spec.suspend): the operator holds each queued
# stage Job at parallelism 0 and the watcher plays the queue, admitting each Job by setting its parallelism.
QUEUE = "e2e-queue"
PPO_NODES = 2


def tiny_pipeline(bucket: str, endpoint: str) -> dict[str, Any]:
    """examples/tiny-cpu.yaml pointed at the session SeaweedFS, one CPU rank per stage and fewer steps (CI
    budget); sft checkpoints often so a killed attempt has something to resume from."""
    obj = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    obj["metadata"] = {"name": NAME, "labels": {QUEUE_NAME_LABEL: QUEUE}}
    spec = obj["spec"]
    spec["storage"] = {"uri": f"s3://{bucket}/pipelines", "endpoint": endpoint, "secretRef": {"name": "s3-credentials"}}
    spec["data"]["maxSamples"] = 256
    st = spec["stages"]
    for stage in ("sft", "reward", "ppo"):
        st[stage].update(gpusPerNode=1, resources={})
    st["sft"].update(epochs=20, maxSteps=40, checkpointEverySteps=5, perDeviceBatchSize=8)
    st["reward"].update(epochs=1, maxSteps=8, checkpointEverySteps=0, perDeviceBatchSize=8)
    st["ppo"].update(maxSteps=4, checkpointEverySteps=2, perDeviceBatchSize=4, generationBatchSize=4, maxAnswerLen=8)
    # Step 3 as 2 pods of one Indexed Job (issue 14): ZeRO-3 partitions the actor and critic across the pods,
    # which rendezvous at <job>-0.<svc> over gloo and each upload their share of the checkpoints.
    st["ppo"].update(nodes=PPO_NODES, actorZeroStage=3, criticZeroStage=3)
    spec["serving"].update(maxNewTokens=16, resources={})
    # The pod surface: a user volume + mount and an env var from a Secret reach every pod (docs: The pod surface).
    spec["podTemplate"] = {"spec": {
        "nodeSelector": {GPU_POOL_LABEL: "ready"},
        "volumes": [{"name": "model-cache", "emptyDir": {}}],
        "containers": [{"name": "trainer", "volumeMounts": [{"name": "model-cache", "mountPath": "/cache"}],
                        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token",
                                                                                     "key": "token"}}}]}],
    }}
    return obj


@dataclass
class Run:
    ns: str
    api: KubeREST
    control_plane: Any
    kubelet: Any
    s3: Any
    bucket: str
    history: list[tuple[str, str]] = field(default_factory=list)
    jobs_seen: dict[str, str] = field(default_factory=dict)  # job name -> uid (a re-created Job changes uid)
    sft_kill_time: float = 0.0
    sft_kill_step: int = 0
    operator_kills: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    pending_status: dict[str, Any] = field(default_factory=dict)  # status while no node matched
    admitted: list[str] = field(default_factory=list)  # Jobs the watcher found held and admitted, as a queue would
    planted: dict[str, str] = field(default_factory=dict)  # Secret -> value no object, log or event may hold

    def pipeline(self) -> dict[str, Any]:
        return self.api.get(f"{GROUP_PATH}/namespaces/{self.ns}/rlhfpipelines/{NAME}")

    def status(self) -> dict[str, Any]:
        return self.pipeline().get("status") or {}

    def jobs(self) -> list[dict[str, Any]]:
        return self.api.get(f"/apis/batch/v1/namespaces/{self.ns}/jobs", labelSelector=f"{LABEL_PIPELINE}={NAME}")["items"]

    def describe(self) -> str:
        try:
            st = self.status()
        except Exception as e:  # noqa: BLE001
            st = {"error": str(e)}
        op = [r for r in self.kubelet.active(OPERATOR_NS)]
        op_log = self.kubelet.logs(OPERATOR_NS, op[0].name)[-3000:] if op else "(operator not running)"
        pods = self.api.get(f"/api/v1/namespaces/{self.ns}/pods")["items"]
        tails = []
        for p in pods:
            with contextlib.suppress(KeyError):
                tails.append(f"--- {p['metadata']['name']} ({(p.get('status') or {}).get('phase')}):\n"
                             + self.kubelet.logs(self.ns, p["metadata"]["name"])[-1500:])
        return (f"status: {json.dumps(st, indent=1)[:3000]}\nhistory: {self.history}\njobs: {list(self.jobs_seen)}\n"
                f"operator log tail:\n{op_log}\npod logs:\n" + "\n".join(tails))

    def operator_pod(self) -> str:
        pods = self.api.get(f"/api/v1/namespaces/{OPERATOR_NS}/pods", labelSelector="app.kubernetes.io/name=kuberlhf")
        return pods["items"][0]["metadata"]["name"]

    def kill_operator(self, when: str) -> None:
        """Kill the operator's process as a crash would; the process kubelet restarts the container
        (restartPolicy Always), and the new process must carry on from the API state alone."""
        pod = self.operator_pod()
        run = self.kubelet.find(OPERATOR_NS, pod)
        before = run.containers[0].restart_count
        assert self.kubelet.kill_pod(OPERATOR_NS, pod), "operator process not running"
        self.operator_kills.append(when)
        wait_for(lambda: run.containers[0].restart_count > before and run.containers[0].ready,
                 f"the operator to restart after the kill {when}", 60, 0.2, describe=self.describe)


def _watch_status(run: Run, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            st = run.status()
            key = (st.get("phase", ""), st.get("stage", ""))
            if not run.history or run.history[-1] != key:
                run.history.append(key)
            for j in run.jobs():
                name = j["metadata"]["name"]
                run.jobs_seen.setdefault(name, j["metadata"]["uid"])
                stage = st.get("stages", {}).get(st.get("stage", ""), {})
                # Once the operator reports the stage Queued, the queue admits it (asserted in the queue test).
                held = job_held(j["spec"]) and name not in run.admitted
                if held and stage.get("phase") == "Queued" and stage.get("jobName") == name:
                    run.api.merge_patch(f"/apis/batch/v1/namespaces/{run.ns}/jobs/{name}",
                                        {"spec": {"parallelism": j["spec"]["completions"]}})
                    run.admitted.append(name)
        except Exception:  # noqa: BLE001 - the pipeline may not exist yet
            pass
        stop.wait(0.3)


@pytest.fixture(scope="module")
def operator_chart(operator_install):
    """The chart rendered for namespaced mode and applied for real; its operator Deployment runs as a pod."""
    ns = f"rlhf-{uuid.uuid4().hex[:6]}"
    with operator_install(OPERATOR_NS, {"watch": {"namespaces": [ns]}}, namespaces=[ns], reconcile_interval=5) as inst:
        yield {"namespace": ns, "objects": inst.objects}


@pytest.fixture(scope="module")
def run(control_plane, kubelet, operator_chart, s3_server) -> Run:
    ns = operator_chart["namespace"]
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    r = Run(ns=ns, api=api, control_plane=control_plane, kubelet=kubelet, s3=s3_server, bucket=bucket)
    control_plane.kubectl("create", "secret", "generic", "s3-credentials", "-n", ns,
                          f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key}",
                          f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_key}")
    control_plane.kubectl("create", "secret", "generic", "hf-token", "-n", ns, f"--from-literal=token={HF_TOKEN}")
    # Secrets the pipeline does not reference, in its namespace and in another one (test_no_secret_value_leaks)
    planted_ns = f"planted-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", planted_ns)
    for where, secret in ((ns, "unreferenced"), (planted_ns, "planted")):
        r.planted[f"{where}/{secret}"] = value = f"planted-{uuid.uuid4().hex}"
        control_plane.kubectl("create", "secret", "generic", secret, "-n", where, f"--from-literal=token={value}")
    t0 = time.monotonic()
    control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(tiny_pipeline(bucket, s3_server.endpoint)))
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_status, args=(r, stop), daemon=True)
    watcher.start()
    try:
        _drive(r)
        wait_for(lambda: r.status().get("phase") in ("Succeeded", "Failed"), "the pipeline to finish",
                 RUN_TIMEOUT, 1.0, describe=r.describe)
    finally:
        stop.set()
        watcher.join(5)
        with contextlib.suppress(Exception):  # the watcher may have stopped just before the last transition
            final = (r.status().get("phase", ""), r.status().get("stage", ""))
            if r.history[-1:] != [final]:
                r.history.append(final)
        r.duration_s = time.monotonic() - t0
        print(f"\n[e2e] tiny pipeline: {r.duration_s:.0f}s, history {r.history}, jobs {list(r.jobs_seen)}")
    assert r.status()["phase"] == "Succeeded", r.describe()
    return r


def _drive(r: Run) -> None:
    """The faults, in pipeline order."""
    from kuberlhf.contract.stage import StageLayout
    from kuberlhf.storage import ObjectStore

    sft1 = job_name(NAME, "sft", 1)
    # No node has the pool label yet: the pipeline is Pending with the scheduler's reason; then the pool "scales up".
    r.pending_status = wait_for(lambda: (st := r.status()).get("reason") == "Unschedulable" and st,
                                "the pipeline to report its unschedulable pod", 60, 0.2, describe=r.describe)
    r.control_plane.kubectl("label", "node", "--overwrite", r.kubelet.node_name, f"{GPU_POOL_LABEL}=ready")
    wait_for(lambda: r.kubelet.active(r.ns, {"job-name": sft1}), "the first sft pod to run", 120, 0.3, describe=r.describe)
    r.kill_operator("mid-stage (sft running)")

    # A pod failure: kill the sft process right after its first checkpoint is committed.
    uid = r.pipeline()["metadata"]["uid"]
    layout = StageLayout(storage_uri=f"s3://{r.bucket}/pipelines", namespace=r.ns, pipeline=NAME, uid=uid)
    store = ObjectStore.from_uri(layout.storage_uri, endpoint=r.s3.endpoint, env=r.s3.credentials_env())
    ckpts = wait_for(lambda: store.list_checkpoints(layout.ckpt_root("sft")), "the first sft checkpoint", 240, 0.1,
                     describe=r.describe)
    pods = r.kubelet.active(r.ns, {"job-name": sft1})
    assert pods, f"sft attempt 1 finished before it could be killed (checkpoints {ckpts}); slow the sft stage down"
    r.sft_kill_time = time.time()
    assert r.kubelet.kill_pod(r.ns, pods[0].name)
    pods[0].done.wait(30)
    # The newest checkpoint the dead attempt committed: where the retry must resume.
    r.sft_kill_step = store.list_checkpoints(layout.ckpt_root("sft"))[-1][0]

    # The retry's Job succeeds: kill the operator at that stage boundary.
    sft2 = job_name(NAME, "sft", 2)
    wait_for(lambda: (r.api.get(f"/apis/batch/v1/namespaces/{r.ns}/jobs/{sft2}").get("status") or {}).get("succeeded"),
             "the sft retry to succeed", 300, 0.2, describe=r.describe)
    r.kill_operator("at the sft -> reward boundary")


# --- the assertions, all on the one run ----------------------------------------------------------------------

def test_pipeline_walks_every_stage_and_succeeds(run):
    stages = [s for _, s in run.history if s]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["sft", "reward", "ppo", "serving", "done"], run.history
    # Pending (API conventions) while no pod of the sft Job could run, then Running.
    assert run.history.index(("Pending", "sft")) < run.history.index(("Running", "sft")), run.history
    assert run.pending_status["phase"] == "Pending" and run.pending_status["stages"]["sft"]["phase"] == "Pending"
    assert "didn't match Pod's node affinity/selector" in run.pending_status["message"], run.pending_status
    assert run.history[-1] == ("Succeeded", "done")
    assert run.operator_kills == ["mid-stage (sft running)", "at the sft -> reward boundary"]


def test_status_conditions_and_checkpoints(run):
    st = run.status()
    conds = {c["type"]: c for c in st["conditions"]}
    for ctype in ("SFTSucceeded", "RewardSucceeded", "PPOSucceeded", "Serving", "Ready"):
        assert conds[ctype]["status"] == "True", (ctype, conds)
        assert conds[ctype]["reason"] and conds[ctype]["lastTransitionTime"]
    assert st.get("observedGeneration") == run.pipeline()["metadata"]["generation"]
    for stage in ("sft", "reward", "ppo"):
        s = st["stages"][stage]
        assert s["phase"] == "Succeeded" and s["checkpoint"].endswith(f"/{stage}") and len(s["manifestSha256"]) == 64
    assert st["stages"]["sft"]["attempts"] == 2 and st["stages"]["reward"]["attempts"] == 1
    assert st["chatEndpoint"] == f"http://{chat_name(NAME)}.{run.ns}.svc:8000/v1"


def test_events_record_every_transition(run):
    events = run.api.get(f"/api/v1/namespaces/{run.ns}/events",
                         fieldSelector=f"involvedObject.name={NAME},involvedObject.kind=RLHFPipeline")["items"]
    reasons = [e["reason"] for e in sorted(events, key=lambda e: e.get("firstTimestamp") or "")]
    assert "StageRetrying" in reasons and "Succeeded" in reasons, reasons
    assert reasons.count("Unschedulable") == 1 and reasons.index("Unschedulable") < reasons.index("StageRunning")
    assert reasons.count("StageSucceeded") == 3, reasons
    retry = next(e for e in events if e["reason"] == "StageRetrying")
    assert retry["type"] == "Warning" and "sft" in retry["message"]


def test_no_duplicate_jobs_across_operator_restarts(run):
    names = sorted(j["metadata"]["name"] for j in run.jobs())
    assert names == sorted([job_name(NAME, "sft", 1), job_name(NAME, "sft", 2), job_name(NAME, "reward", 1),
                            job_name(NAME, "ppo", 1)]), names
    # and none was deleted and re-created in between (same uid as when first seen)
    assert {j["metadata"]["name"]: j["metadata"]["uid"] for j in run.jobs()} == run.jobs_seen


def test_failed_pod_is_retried_and_resumes_from_its_checkpoint(run):
    from kuberlhf.contract.stage import StageLayout
    from kuberlhf.storage import ObjectStore

    uid = run.pipeline()["metadata"]["uid"]
    layout = StageLayout(storage_uri=f"s3://{run.bucket}/pipelines", namespace=run.ns, pipeline=NAME, uid=uid)
    store = ObjectStore.from_uri(layout.storage_uri, endpoint=run.s3.endpoint, env=run.s3.credentials_env())
    rows = [json.loads(line) for line in store.get_bytes(f"{layout.stage_uri('sft')}/metrics.jsonl").decode().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 20, steps  # each step once, none lost
    # Steps up to the killed attempt's checkpoint were trained before the kill; the retry did only the rest.
    before = [r for r in rows if r["split"] == "train" and r["step"] <= run.sft_kill_step]
    after = [r for r in rows if r["split"] == "train" and r["step"] > run.sft_kill_step]
    assert before and all(r["time"] < run.sft_kill_time for r in before)
    assert after and all(r["time"] > run.sft_kill_time for r in after)
    failed = [p for p in run.api.get(f"/api/v1/namespaces/{run.ns}/pods", labelSelector=f"job-name={job_name(NAME, 'sft', 1)}")["items"]
              if p["status"]["phase"] == "Failed"]
    assert failed and failed[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


def test_user_volume_and_secret_env_reach_every_pod(run):
    """The podTemplate survived the API server (no pruning) and the merge: every Job and the chat Deployment carry
    the user's volume, mount and env.valueFrom next to the operator's own; the chat process got the value."""
    deployment = run.api.get(f"/apis/apps/v1/namespaces/{run.ns}/deployments/{chat_name(NAME)}")
    for obj in [*run.jobs(), deployment]:
        pod = obj["spec"]["template"]["spec"]
        assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"], obj["metadata"]["name"]
        assert any(v["name"] == "dshm" for v in pod["volumes"])
        trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
        mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
        assert mounts == {"/dev/shm": "dshm", "/cache": "model-cache", "/home/kuberlhf": "home", "/tmp": "tmp"}, (
            obj["metadata"]["name"])
        env = {e["name"]: e for e in trainer["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    chat = next(p for p in run.kubelet.active(run.ns) if p.name.startswith(chat_name(NAME)))
    assert chat.containers[0].env["HF_TOKEN"] == HF_TOKEN


def test_kubectl_get_rlhf_shows_the_columns(run):
    out = run.control_plane.kubectl("get", "rlhf", "-n", run.ns).stdout.splitlines()
    assert out[0].split() == ["NAME", "ALGORITHM", "STAGE", "PHASE", "ATTEMPTS", "AGE", "CHAT"], out
    row = out[1].split()
    assert row[:4] == [NAME, "ppo", "done", "Succeeded"] and row[-1].startswith(f"http://{chat_name(NAME)}."), out


def test_chat_pod_answers_an_openai_request(run):
    """With the API key of the Secret the operator generated (status.chatApiKeySecret); without it a 401 in OpenAI's
    error shape, /metrics included."""
    import base64

    import httpx
    from openai import AuthenticationError, OpenAI

    url = wait_for(lambda: run.kubelet.service_url(run.ns, chat_name(NAME)), "a Ready chat pod", 60)
    secret_name = run.status()["chatApiKeySecret"]
    assert secret_name == generated_api_key_secret_name(NAME)
    secret = run.api.get(f"/api/v1/namespaces/{run.ns}/secrets/{secret_name}")
    key = base64.b64decode(secret["data"]["API_KEY"]).decode()
    assert len(key) >= 40 and key not in json.dumps(run.pipeline())  # the value is never in the pipeline object
    with pytest.raises(AuthenticationError) as err:
        OpenAI(base_url=f"{url}/v1", api_key="wrong", timeout=60, max_retries=0).models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    client = OpenAI(base_url=f"{url}/v1", api_key=key, timeout=60, max_retries=0)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, max_tokens=8,
                                           messages=[{"role": "user", "content": "How do I boil an egg?"}])
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8


def test_every_stage_attempt_and_the_chat_get_a_network_policy(run):
    """The 1.20 API server stores NetworkPolicies (and validates them) but nothing here enforces them (no network
    plugin; the process kubelet runs pods as local processes): what is checked is that the operator made them, with
    the chart's RBAC, owned by the pipeline. What they allow is tested in tests/operator/test_network_and_chat_exposure.py."""
    items = run.api.get(f"/apis/networking.k8s.io/v1/namespaces/{run.ns}/networkpolicies",
                        labelSelector=f"{LABEL_PIPELINE}={NAME}")["items"]
    uid = run.pipeline()["metadata"]["uid"]
    assert sorted(p["metadata"]["name"] for p in items) == sorted([*(j["metadata"]["name"] for j in run.jobs()),
                                                                    chat_name(NAME)])
    for p in items:
        assert p["metadata"]["ownerReferences"][0]["uid"] == uid
        assert p["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_the_queue_labels_reach_the_jobs_and_the_chat(run):
    """Every stage Job was held (1.20: parallelism 0, no suspend field) until the watcher admitted it, as a queue
    would; each went Queued/WaitingForQuota first (tests/e2e/test_security.py checks the hold itself)."""
    deployment = run.api.get(f"/apis/apps/v1/namespaces/{run.ns}/deployments/{chat_name(NAME)}")
    for obj in [*run.jobs(), deployment]:
        assert obj["metadata"]["labels"][QUEUE_NAME_LABEL] == QUEUE, obj["metadata"]["name"]
        assert "suspend" not in obj["spec"]  # 1.20 has no Job.spec.suspend: the operator sends none
    assert deployment["spec"]["template"]["metadata"]["labels"][QUEUE_NAME_LABEL] == QUEUE
    assert sorted(run.admitted) == sorted(run.jobs_seen), (run.admitted, run.jobs_seen)
    assert ("Queued", "sft") in run.history and ("Queued", "ppo") in run.history, run.history


def test_no_secret_value_leaks_into_objects_logs_or_events(run):
    """Finding 5 against the real API server: the values of the Secrets the pipeline references (storage keys,
    decoded by the operator's storage probe; HF_TOKEN; the chat's generated API key), and of Secrets it does not
    (one in its namespace, one planted in another), appear in no object of the pipeline's or the operator's
    namespace other than their own Secret (the pipeline with its status and kopf's annotations, Jobs, Pods,
    Deployments, ReplicaSets, Services, Endpoints, NetworkPolicies, ConfigMaps), in no Event of any namespace, and
    in no log of the operator or of any pod, raw or base64-encoded."""
    import base64

    key = base64.b64decode(run.api.get(f"/api/v1/namespaces/{run.ns}/secrets/{generated_api_key_secret_name(NAME)}")
                           ["data"]["API_KEY"]).decode()
    values = {**run.planted, f"{run.ns}/s3-credentials": run.s3.secret_key, f"{run.ns}/hf-token": HF_TOKEN,
              f"{run.ns}/{generated_api_key_secret_name(NAME)}": key}
    texts: dict[str, str] = {"pipeline": json.dumps(run.pipeline())}
    for ns in (run.ns, OPERATOR_NS):
        for path in ("/api/v1/namespaces/{ns}/pods", "/apis/batch/v1/namespaces/{ns}/jobs",
                     "/apis/apps/v1/namespaces/{ns}/deployments", "/apis/apps/v1/namespaces/{ns}/replicasets",
                     "/api/v1/namespaces/{ns}/services", "/api/v1/namespaces/{ns}/endpoints",
                     "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
                     "/api/v1/namespaces/{ns}/configmaps", f"{GROUP_PATH}/namespaces/{{ns}}/rlhfpipelines"):
            for o in run.api.get(path.format(ns=ns))["items"]:
                texts[f"{o['kind'] if 'kind' in o else path.rsplit('/', 1)[1]} {ns}/{o['metadata']['name']}"] = (
                    json.dumps(o))
        for p in run.api.get(f"/api/v1/namespaces/{ns}/pods")["items"]:
            with contextlib.suppress(KeyError):
                texts[f"log {ns}/{p['metadata']['name']}"] = run.kubelet.logs(ns, p["metadata"]["name"])
    texts["events"] = json.dumps(run.api.get("/api/v1/events")["items"])
    assert any(k.startswith("log ") and "tiny-sft" in k for k in texts) and len(texts) > 20, sorted(texts)
    for secret, value in values.items():
        for form in (value, base64.b64encode(value.encode()).decode()):
            assert not [where for where, text in texts.items() if form in text], (secret, form[:6])
    # and the Secrets themselves hold only their own values (no copy of another's data)
    for ns in (run.ns, OPERATOR_NS):
        for o in run.api.get(f"/api/v1/namespaces/{ns}/secrets")["items"]:
            own = f"{ns}/{o['metadata']['name']}"
            data = " ".join(base64.b64decode(v).decode(errors="replace") for v in (o.get("data") or {}).values())
            assert not [s for s, v in values.items() if s != own and v in data], own


def test_ppo_ran_as_two_pods_rendezvousing_at_zero3(run):
    """Step 3 with ``nodes: 2`` through the operator: one Job of 2 pods (completion indices 0 and 1 as NODE_RANK,
    MASTER_ADDR rank 0's name under the headless Service), both Succeeded, and the checkpoint committed to S3 holds
    both ranks' ZeRO-3 partitions (DeepSpeed writes one optimizer-state file per data-parallel rank, so a world of
    1 cannot produce it: the pods trained together)."""
    from kuberlhf.contract.stage import StageLayout
    from kuberlhf.storage import ObjectStore

    ppo = job_name(NAME, "ppo", 1)
    job = run.api.get(f"/apis/batch/v1/namespaces/{run.ns}/jobs/{ppo}")
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (PPO_NODES, PPO_NODES), job["spec"]
    assert job["status"].get("succeeded") == PPO_NODES, job["status"]
    svc = run.api.get(f"/api/v1/namespaces/{run.ns}/services/{ppo}")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    pods = run.api.get(f"/api/v1/namespaces/{run.ns}/pods", labelSelector=f"job-name={ppo}")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"] * PPO_NODES, [p["status"] for p in pods]
    ranks = []
    for p in pods:
        assert p["spec"]["subdomain"] == ppo
        env = {e["name"]: e for e in p["spec"]["containers"][0]["env"]}
        assert env["MASTER_ADDR"]["value"] == f"{ppo}-0.{ppo}" and env["NNODES"]["value"] == str(PPO_NODES)
        assert "valueFrom" in env["NODE_RANK"]  # the completion index, through the downward API
        ran = run.kubelet.find(run.ns, p["metadata"]["name"]).containers[0].env
        assert ran["NODE_RANK"] == p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        ranks.append(ran["NODE_RANK"])
    assert sorted(ranks) == [str(i) for i in range(PPO_NODES)], ranks

    uid = run.pipeline()["metadata"]["uid"]
    layout = StageLayout(storage_uri=f"s3://{run.bucket}/pipelines", namespace=run.ns, pipeline=NAME, uid=uid)
    store = ObjectStore.from_uri(layout.storage_uri, endpoint=run.s3.endpoint, env=run.s3.credentials_env())
    ckpts = store.list_checkpoints(layout.ckpt_root("ppo"))
    assert ckpts, "no committed ppo checkpoint"
    paths = [f.path for f in store.read_manifest(ckpts[-1][1]).files]
    for rank in range(PPO_NODES):
        assert f"trainer_state_rank{rank}.pt" in paths, paths
        for engine in ("actor", "critic"):  # each rank's own partition of the optimizer state
            assert any(x.startswith(f"{engine}/") and f"zero_pp_rank_{rank}_" in x and x.endswith("optim_states.pt")
                       for x in paths), (engine, rank, paths)


def test_deleting_the_pipeline_garbage_collects_its_children(run):
    # Foreground: the pipeline stays (deletionTimestamp, foregroundDeletion finalizer) until the garbage collector
    # deleted every child that blocks its owner's deletion, then goes itself.
    run.control_plane.kubectl("delete", "rlhf", NAME, "-n", run.ns, "--cascade=foreground", "--wait=false")
    meta = run.pipeline()["metadata"]
    assert meta.get("deletionTimestamp") and "foregroundDeletion" in meta.get("finalizers", []), meta

    def leftovers() -> list[str]:
        out = run.api.names(run.ns, ("/apis/batch/v1/namespaces/{ns}/jobs", "/api/v1/namespaces/{ns}/services",
                                     "/apis/apps/v1/namespaces/{ns}/deployments",
                                     "/apis/apps/v1/namespaces/{ns}/replicasets", "/api/v1/namespaces/{ns}/pods",
                                     "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"))
        return out + run.api.names(run.ns, ("/api/v1/namespaces/{ns}/secrets",), labelSelector=f"{LABEL_PIPELINE}={NAME}")

    wait_for(lambda: not leftovers(), "the garbage collector to delete every child of the pipeline", 120, 1.0,
             describe=lambda: str(leftovers()))
    assert not run.kubelet.active(run.ns), "processes of deleted pods still run"
    wait_for(lambda: not run.api.get(f"{GROUP_PATH}/namespaces/{run.ns}/rlhfpipelines")["items"],
             "the pipeline itself to go after its children", 30, 0.5)


def test_a_spec_that_cannot_run_is_invalid_before_any_child_exists(control_plane, operator_chart):
    """The operator's preflight through the real API server: a spec the CRD schema accepts but that cannot run
    (fp16 on CPU; a dataset URI naming a bucket and no object) is Failed/InvalidSpec naming both fields and their
    fixes, with one Warning Event, and no Job, Service, Deployment or Pod is ever made; it is not retried. Fixing
    the spec starts the first Job."""
    ns = operator_chart["namespace"]
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    name = "cannot-run"
    obj = tiny_pipeline("nowhere", "http://127.0.0.1:9")
    obj["metadata"] = {"name": name}
    obj["spec"]["stages"]["sft"]["dtype"] = "fp16"
    obj["spec"]["data"]["datasets"] = [{"path": "s3://some-bucket"}]
    obj["spec"]["podTemplate"]["spec"]["nodeSelector"] = {"kuberlhf.io/e2e-no-such-pool": "true"}  # never runs
    path = f"{GROUP_PATH}/namespaces/{ns}/rlhfpipelines/{name}"

    def children() -> list[str]:
        return api.names(ns, ("/apis/batch/v1/namespaces/{ns}/jobs", "/api/v1/namespaces/{ns}/services",
                              "/apis/apps/v1/namespaces/{ns}/deployments"), labelSelector=f"{LABEL_PIPELINE}={name}")

    control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
    try:
        status = wait_for(lambda: (st := api.get(path).get("status") or {}).get("reason") == "InvalidSpec" and st,
                          "the operator to report InvalidSpec", 60, 0.3)
        assert status["phase"] == "Failed", status
        for text in ("spec.stages.sft.dtype: fp16 needs CUDA", "spec.data.datasets[0].path:", "fix:"):
            assert text in status["message"], status["message"]
        time.sleep(12)  # two periodic reconciles (KUBERLHF_RECONCILE_INTERVAL=5): still nothing, nothing new
        assert children() == [] and not api.get(f"/api/v1/namespaces/{ns}/pods",
                                                  labelSelector=f"{LABEL_PIPELINE}={name}")["items"]
        events = api.get(f"/api/v1/namespaces/{ns}/events", fieldSelector=f"involvedObject.name={name}")["items"]
        assert [e["reason"] for e in events if e["reason"] == "InvalidSpec"] == ["InvalidSpec"], events
        assert sum(e.get("count", 1) for e in events if e["reason"] == "InvalidSpec") == 1, events
        fixed = {"spec": {"stages": {"sft": {"dtype": "bf16"}}, "data": {"datasets": ["kuberlhf/synthetic-pairs"]}}}
        control_plane.kubectl("patch", "rlhf", name, "-n", ns, "--type", "merge", "-p", json.dumps(fixed))
        wait_for(lambda: f"jobs/{job_name(name, 'sft', 1)}" in children(), "the fixed spec's first Job", 60, 0.3)
    finally:  # leave nothing behind for the next test (and no pod for the kubelet at teardown)
        control_plane.kubectl("delete", "rlhf", name, "-n", ns, "--cascade=foreground", "--wait=false", check=False)
        pods = f"/api/v1/namespaces/{ns}/pods"
        wait_for(lambda: not children() and not api.get(pods, labelSelector=f"{LABEL_PIPELINE}={name}")["items"]
                 and not api.get(f"{GROUP_PATH}/namespaces/{ns}/rlhfpipelines",
                                 fieldSelector=f"metadata.name={name}")["items"],
                 f"pipeline {name} and its children to be deleted", 90, 0.5)
