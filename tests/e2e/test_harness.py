"""The harness itself against the real control plane: Jobs and Deployments made by the real controllers are run
by the process kubelet with env resolved, indices assigned, failures reported and deletions honoured."""

from __future__ import annotations

import sys
import time
import urllib.request

from harness import KubeREST, wait_for
from harness.podspec import JOB_COMPLETION_INDEX_ANNOTATION

PY = sys.executable


def _job(name: str, script: str, completions: int = 1, env: list | None = None) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "completions": completions, "parallelism": completions, "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "kuberlhf/trainer:test", "command": [PY, "-c", script],
                "env": env or [],
            }]}},
        },
    }


def _pods(api: KubeREST, ns: str, selector: str) -> list[dict]:
    return api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=selector)["items"]


def test_indexed_job_env_and_success(control_plane, kubelet, namespace):
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    ns = namespace
    api.post(f"/api/v1/namespaces/{ns}/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
                                                  "stringData": {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk"}})
    api.post(f"/api/v1/namespaces/{ns}/services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rdzv"},
                                                   "spec": {"clusterIP": "None", "selector": {"job-name": "pairs"},
                                                            "ports": [{"port": 29500}]}})
    script = ("import os; print('ENV', os.environ['AWS_ACCESS_KEY_ID'], os.environ['POD'], os.environ['RANK'],"
              " os.environ['JOB_COMPLETION_INDEX'], os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'],"
              " os.environ.get('KUBECONFIG'))")
    env = [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{JOB_COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "MASTER_ADDR", "value": "pairs-0.rdzv"},
        {"name": "MASTER_PORT", "value": "29500"},
    ]
    api.post(f"/apis/batch/v1/namespaces/{ns}/jobs", _job("pairs", script, completions=2, env=env))
    wait_for(lambda: (api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/pairs").get("status") or {}).get("succeeded") == 2,
             "job pairs to succeed twice", timeout=60,
             describe=lambda: str([p["status"] for p in _pods(api, ns, "job-name=pairs")]))
    pods = _pods(api, ns, "job-name=pairs")
    lines = sorted(kubelet.logs(ns, p["metadata"]["name"]).strip() for p in pods)
    ranks = sorted(line.split()[3] for line in lines)
    assert ranks == ["0", "1"], lines
    for p, line in zip(sorted(pods, key=lambda p: p["metadata"]["name"]), sorted(lines, key=lambda s: s.split()[2]), strict=True):
        _, key, pod_name, rank, index, addr, port, kubeconfig = line.split()
        assert (key, pod_name, addr) == ("ak", p["metadata"]["name"], "127.0.0.1")
        assert kubeconfig.endswith("serviceaccount.kubeconfig")  # the pod's SA token, never the admin's
        assert rank == index
        assert port != "29500"  # one free local port per Job rendezvous
        assert p["status"]["phase"] == "Succeeded"
        assert p["spec"]["nodeName"] == "process-kubelet"
        assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert len({line.split()[6] for line in lines}) == 1  # both pods agree on the rendezvous port


def test_two_single_node_jobs_at_once_get_their_own_loopback_rendezvous_port(control_plane, kubelet, namespace):
    """The operator's single-node stages rendezvous at 127.0.0.1:29500, each pod in its own network on a cluster.
    Here all pods share one: two such Jobs at once (two pipelines' stages) must each get their own local port;
    sharing one, the second stage failed with EADDRINUSE."""
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    ns = namespace
    script = ("import os, socket, time; s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['MASTER_PORT'])));"
              " s.listen(); print('BOUND', os.environ['MASTER_PORT'], flush=True); time.sleep(float(os.environ['HOLD']))")
    def env(hold: str) -> list[dict[str, str]]:
        return [{"name": "MASTER_ADDR", "value": "127.0.0.1"}, {"name": "MASTER_PORT", "value": "29500"},
                {"name": "HOLD", "value": hold}]

    api.post(f"/apis/batch/v1/namespaces/{ns}/jobs", _job("first", script, env=env("60")))
    pod = wait_for(lambda: next(iter(kubelet.active(ns, {"job-name": "first"})), None), "first running", 60)
    wait_for(lambda: "BOUND" in kubelet.logs(ns, pod.name), "the first Job to bind its port", 60, 0.1)
    api.post(f"/apis/batch/v1/namespaces/{ns}/jobs", _job("second", script, env=env("0")))  # while the first holds it
    done = wait_for(lambda: (st := api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/second").get("status") or {}).get(
        "succeeded", 0) + st.get("failed", 0) and st, "the second Job to finish", 60)
    assert done.get("succeeded") == 1, [p["status"] for p in _pods(api, ns, "job-name=second")]
    second = _pods(api, ns, "job-name=second")[0]["metadata"]["name"]
    assert kubelet.logs(ns, second).split()[1] != kubelet.logs(ns, pod.name).split()[1]
    assert kubelet.kill_pod(ns, pod.name)


def test_killed_process_fails_the_pod_with_its_log_tail(control_plane, kubelet, namespace):
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    ns = namespace
    api.post(f"/apis/batch/v1/namespaces/{ns}/jobs",
             _job("sleeper", "import time; print('step 1 of 100', flush=True); time.sleep(600)"))
    pod = wait_for(lambda: next((r for r in kubelet.active(ns, {"job-name": "sleeper"})), None), "sleeper running", 60)
    wait_for(lambda: "step 1" in kubelet.logs(ns, pod.name), "sleeper's first log line", 30, 0.1)
    assert kubelet.kill_pod(ns, pod.name)
    status = wait_for(lambda: (s := api.get(f"/api/v1/namespaces/{ns}/pods/{pod.name}")["status"])["phase"] == "Failed" and s,
                      "killed pod to be Failed", 30)
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 137 and "step 1 of 100" in term["message"]
    wait_for(lambda: (api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/sleeper").get("status") or {}).get("failed") == 1,
             "the Job controller to count the failure", 30)


def test_deployment_pod_gets_ready_and_deletion_kills_it(control_plane, kubelet, namespace):
    api = KubeREST.from_kubeconfig(control_plane.kubeconfig)
    ns = namespace
    server = ("import http.server, sys, time; time.sleep(1)\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok ' + self.path.encode())\n"
              "http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), H).serve_forever()\n")
    labels = {"app": "web"}
    api.post(f"/apis/apps/v1/namespaces/{ns}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{
                "name": "web", "image": "x", "command": [PY, "-c", server], "args": ["--port", "8000"],
                "ports": [{"containerPort": 8000, "name": "http"}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
            }]}}},
    })
    api.post(f"/api/v1/namespaces/{ns}/services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                                   "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]}})

    def ready_pod():
        for p in _pods(api, ns, "app=web"):
            conds = {c["type"]: c["status"] for c in (p.get("status") or {}).get("conditions") or []}
            if conds.get("Ready") == "True":
                return p
        return None

    pod = wait_for(ready_pod, "web pod Ready via its readiness probe", 60)
    url = kubelet.service_url(ns, "web")
    assert urllib.request.urlopen(url + "/hello", timeout=5).read() == b"ok /hello"
    run = kubelet.find(ns, pod["metadata"]["name"])
    pids = run.pids()
    assert pids
    api.delete(f"/apis/apps/v1/namespaces/{ns}/deployments/web", {"propagationPolicy": "Foreground"})
    wait_for(lambda: not _pods(api, ns, "app=web"), "the GC to delete the web pod (kubelet confirms)", 60)
    assert not run.pids()
    time.sleep(0.2)
    for pid in pids:
        try:
            import os

            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, f"process {pid} of a deleted pod still runs"
