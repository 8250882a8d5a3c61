"""Benchmark 4: operator latency and scale on the real control plane (tests/harness: etcd + kube-apiserver +
kube-controller-manager v1.20.2 on loopback) with the real operator (``kuberlhf-operator`` subprocess, kopf) and
a real SeaweedFS for the stage outputs.

No trainer runs: a stage "finishes" the way a real one looks from outside: the benchmark commits the stage's
output to SeaweedFS (files, manifest.json, then ``_COMPLETE``) and then marks the stage Job complete through the
Job status subresource (what the Job controller writes when the pod exits 0). The operator must see the Job
event, probe the object store and create the next stage's Job.

Measured (client-side, from a watch on Jobs):
- CR created -> first (sft) Job created, p50/p95 over ``--pipelines`` pipelines run one after another
  (goal <= 1 s);
- stage Job complete -> next stage Job created (sft -> reward and reward -> ppo), p50/p95 (goal <= 2 s);
- ``--burst`` pipelines created at once: CR -> first Job lag (p50/p95/max), then all their sft Jobs completed at
  once: lag to the reward Job; the operator's peak RSS over the whole run (goal <= 300 MB).

The baseline of the ratios is the goal itself (there is no other operator to race); the API server's own
round trip (POST of a Job) is printed next to it as the floor.

    .venv/bin/python bench/operator_bench.py [--pipelines 20] [--burst 100]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from common import emit, goal_line  # noqa: E402

GROUP_PATH = "/apis/kuberlhf.io/v1alpha1"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95), "max": max(values),
            "mean": statistics.fmean(values)}


class JobWatch:
    """First time each Job of a namespace was seen (ADDED), from a watch kept open in a thread."""

    def __init__(self, api: Any, ns: str):
        self.api, self.ns = api, ns
        self.seen: dict[str, float] = {}
        self.cv = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> JobWatch:
        lst = self.api.get(f"/apis/batch/v1/namespaces/{self.ns}/jobs")
        self.rv = lst["metadata"]["resourceVersion"]
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                for ev in self.api.watch(f"/apis/batch/v1/namespaces/{self.ns}/jobs", self.rv, timeout_seconds=30):
                    obj = ev.get("object") or {}
                    self.rv = (obj.get("metadata") or {}).get("resourceVersion", self.rv)
                    name = (obj.get("metadata") or {}).get("name")
                    if ev.get("type") == "ADDED" and name:
                        with self.cv:
                            self.seen.setdefault(name, time.time())
                            self.cv.notify_all()
                    if self.stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - a dropped watch is re-opened
                time.sleep(0.1)

    def wait(self, name: str, timeout: float = 60.0) -> float:
        deadline = time.time() + timeout
        with self.cv:
            while name not in self.seen:
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"Job {name} was not created within {timeout:.0f}s")
                self.cv.wait(left)
            return self.seen[name]


class RSSMonitor:
    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.interval = interval
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                rss = self.proc.memory_info().rss
                self.samples.append(rss)
                self.peak = max(self.peak, rss)
            self.stop.wait(self.interval)


def pipeline_body(name: str, bucket: str, endpoint: str) -> dict[str, Any]:
    import yaml

    obj = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    obj["metadata"] = {"name": name}
    obj["spec"]["storage"] = {"uri": f"s3://{bucket}/pipelines", "endpoint": endpoint,
                              "secretRef": {"name": "s3-credentials"}}
    return obj


class Bench:
    def __init__(self, cp: Any, api: Any, ns: str, s3: Any, bucket: str, watch: JobWatch):
        from kuberlhf.storage import ObjectStore

        self.cp, self.api, self.ns, self.s3, self.bucket, self.watch = cp, api, ns, s3, bucket, watch
        self.store = ObjectStore.from_uri(f"s3://{bucket}/pipelines", endpoint=s3.endpoint, env=s3.credentials_env())
        self.payload = Path(tempfile.mkdtemp(prefix="kuberlhf-bench-op-"))
        (self.payload / "model").mkdir()
        (self.payload / "model" / "config.json").write_text("{}\n")

    def create(self, name: str) -> tuple[str, float]:
        t0 = time.time()
        obj = self.api.post(f"{GROUP_PATH}/namespaces/{self.ns}/rlhfpipelines",
                            pipeline_body(name, self.bucket, self.s3.endpoint))
        return obj["metadata"]["uid"], t0

    def commit_stage(self, name: str, uid: str, stage: str) -> None:
        from kuberlhf.contract.stage import StageLayout

        layout = StageLayout(storage_uri=f"s3://{self.bucket}/pipelines", namespace=self.ns, pipeline=name, uid=uid)
        self.store.upload_dir(str(self.payload), layout.stage_uri(stage), producer="bench")

    def complete_job(self, job: str) -> float:
        """Mark the Job finished as the Job controller would after its pod exited 0; returns the time.

        The v1.20 Job controller rewrites the whole status of a Job it has not seen finish (GET, then
        UpdateStatus with its own view), so the benchmark first waits until the controller has started the Job
        (``status.active``), as a real pod would run first; from then on the controller leaves a finished Job
        alone."""
        from harness import wait_for

        path = f"/apis/batch/v1/namespaces/{self.ns}/jobs/{job}"
        wait_for(lambda: (self.api.get(path).get("status") or {}).get("active"), f"Job {job} started", 60, 0.05)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        t = time.time()
        self.api.merge_patch(f"/apis/batch/v1/namespaces/{self.ns}/jobs/{job}/status", {"status": {
            "startTime": now, "completionTime": now, "succeeded": 1, "active": 0,
            "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": now,
                            "lastTransitionTime": now}]}})
        return t

    def api_floor(self, n: int = 10) -> float:
        """Median round trip of creating a ConfigMap: what any controller's create costs at least."""
        ts = []
        for i in range(n):
            t0 = time.time()
            self.api.post(f"/api/v1/namespaces/{self.ns}/configmaps",
                          {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"floor-{i}"}})
            ts.append(time.time() - t0)
        return statistics.median(ts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One control plane and one SeaweedFS; per side (``--sides``) a fresh namespace and operator process, the
    latency run, then the burst. With two sides they run one after the other in the same run, the later one
    against a control plane that still holds the earlier one's objects (idle by then: no kubelet runs them)."""
    import psutil  # noqa: F401 - fail early if missing
    from harness import ControlPlane, KubeREST, wait_for

    from kuberlhf.storage.seaweed import SeaweedServer

    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kuberlhf-bench-cp-") as d, \
            ControlPlane(Path(d) / "cp") as cp, SeaweedServer(Path(d) / "s3") as s3:
        res["control_plane_start_s"] = cp.start_seconds
        api = KubeREST.from_kubeconfig(cp.kubeconfig)
        cp.kubectl("apply", "-f", str(REPO / "crds" / "rlhfpipelines-pre-1.25.yaml"))  # 1.20: no CEL rules
        wait_for(lambda: cp.kubectl("get", "crd", "rlhfpipelines.kuberlhf.io", "-o",
                                    "jsonpath={.status.conditions[?(@.type=='Established')].status}"
                                    ).stdout.strip() == "True", "CRD established", 30, 0.2)
        bucket = "bench"
        s3.create_bucket(bucket)
        res["sides"] = {side: run_side(args, cp, api, s3, bucket, Path(d), side) for side in args.sides}
    return res


def run_side(args: argparse.Namespace, cp: Any, api: Any, s3: Any, bucket: str, d: Path, side: str) -> dict[str, Any]:
    """The whole measurement with one operator: ``cache`` reads children from kopf's watch streams (the default),
    ``list`` lists them per reconcile (KUBERLHF_WATCH_CACHE=false: the code path before the cache)."""
    from harness import wait_for
    from harness.controlplane import free_port

    from kuberlhf_operator.manifests import job_name

    res: dict[str, Any] = {}
    ns = f"bench-{side}-{uuid.uuid4().hex[:6]}"
    api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    creds = s3.credentials_env()
    api.post(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
        "stringData": {k: creds[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    live, metrics_port = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig), "KUBERLHF_DEFAULT_IMAGE": "kuberlhf-trainer:bench",
           "KUBERLHF_WATCH_CACHE": "true" if side == "cache" else "false"}
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)  # the operator must use the namespace's Secret, as in a cluster
    log_path = d / f"operator-{side}.log"
    log = open(log_path, "wb")  # noqa: SIM115
    op = subprocess.Popen([sys.executable, "-m", "kuberlhf_operator.main", "--namespace", ns,
                           "--liveness-port", str(live), "--metrics-port", str(metrics_port), "--bind", "127.0.0.1"],
                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rss = RSSMonitor(op.pid)
    try:
        t0 = time.time()
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=2).status == 200,
                 "operator liveness", 90, 0.2)
        res["operator_start_s"] = time.time() - t0
        watch = JobWatch(api, ns).start()
        b = Bench(cp, api, ns, s3, bucket, watch)
        res["api_create_floor_s"] = b.api_floor()

        # --- latency: pipelines one after another -----------------------------------------------------
        first, nxt = [], []
        for i in range(args.pipelines):
            name = f"lat-{i}"
            uid, t_create = b.create(name)
            first.append(watch.wait(job_name(name, "sft", 1)) - t_create)
            for stage, following in (("sft", "reward"), ("reward", "ppo")):
                b.commit_stage(name, uid, stage)
                t_done = b.complete_job(job_name(name, stage, 1))
                nxt.append(watch.wait(job_name(name, following, 1)) - t_done)
        res["cr_to_first_job_s"] = summary(first)
        res["job_complete_to_next_job_s"] = summary(nxt)
        res["rss_after_latency_mb"] = rss.samples[-1] / 2**20 if rss.samples else float("nan")

        # --- scale: a burst of pipelines created at once ---------------------------------------------
        names = [f"burst-{i}" for i in range(args.burst)]
        created: dict[str, tuple[str, float]] = {}
        t_burst = time.time()
        for name in names:
            created[name] = b.create(name)
        res["burst_create_s"] = time.time() - t_burst
        lag = [watch.wait(job_name(n, "sft", 1), timeout=300) - created[n][1] for n in names]
        res["burst_all_first_jobs_s"] = max(watch.seen[job_name(n, "sft", 1)] for n in names) - t_burst
        res["burst_cr_to_first_job_s"] = summary(lag)
        for name in names:
            b.commit_stage(name, created[name][0], "sft")
        done = {n: b.complete_job(job_name(n, "sft", 1)) for n in names}
        lag2 = [watch.wait(job_name(n, "reward", 1), timeout=300) - done[n] for n in names]
        res["burst_job_complete_to_next_job_s"] = summary(lag2)
        time.sleep(1.0)
        res["operator_rss_peak_mb"] = rss.peak / 2**20
        res["operator_rss_end_mb"] = rss.samples[-1] / 2**20
        res["operator_cpu_s"] = sum(psutil_cpu(op.pid))
        page = scrape_metrics(metrics_port)
        res["reconciles"] = labelled(page, "kuberlhf_reconciles_total", "trigger")  # where its CPU went
        res["reconcile_phases"] = reconcile_phases(page)
        watch.stop.set()
    finally:
        rss.stop.set()
        op.terminate()
        try:
            op.wait(10)
        except subprocess.TimeoutExpired:
            op.kill()
            op.wait()
        log.close()
        if args.keep_log:
            print(log_path.read_text(errors="replace")[-4000:])
    return res


def scrape_metrics(port: int) -> str:
    with contextlib.suppress(OSError):
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return ""


def labelled(text: str, metric: str, label: str) -> dict[str, float]:
    """The samples named ``metric`` of a Prometheus text page (prometheus_client's parser), as {their ``label``:
    value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric and label in sample.labels
    }


def reconcile_phases(text: str) -> dict[str, dict[str, float]]:
    """Mean and total seconds of each reconcile phase (``kuberlhf_reconcile_phase_seconds``): where the lag goes."""
    sums = labelled(text, "kuberlhf_reconcile_phase_seconds_sum", "phase")
    counts = labelled(text, "kuberlhf_reconcile_phase_seconds_count", "phase")
    return {k: {"total_s": v, "mean_ms": 1000 * v / counts[k]} for k, v in sums.items() if counts.get(k)}


def psutil_cpu(pid: int) -> tuple[float, float]:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user, t.system
    except psutil.Error:
        return 0.0, 0.0


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    for side, r in res["sides"].items():
        report_side(side, r, res["control_plane_start_s"], args)
    if {"cache", "list"} <= set(res["sides"]):
        c, lst = (res["sides"][k]["burst_job_complete_to_next_job_s"]["p95"] for k in ("cache", "list"))
        print(f"\n  burst of {args.burst}, Job complete -> next Job p95, same run: children from the watch cache "
              f"{c:.3f} s vs listed per reconcile {lst:.3f} s: {lst / c:.2f}x faster")


def report_side(side: str, res: dict[str, Any], cp_start: float, args: argparse.Namespace) -> None:
    def line(label: str, s: dict[str, float]) -> str:
        return f"  {label:44s} p50 {s['p50']:.3f} s  p95 {s['p95']:.3f} s  max {s['max']:.3f} s  (n={s['n']})"

    how = ("children from kopf's watch streams" if side == "cache"
           else "children listed per reconcile, KUBERLHF_WATCH_CACHE=false")
    print(f"\n== operator on the real control plane, {side}: {how} (start {cp_start:.1f} s; operator up in "
          f"{res['operator_start_s']:.1f} s; API create floor {1000 * res['api_create_floor_s']:.0f} ms) ==")
    print(line(f"CR created -> first Job ({args.pipelines} pipelines)", res["cr_to_first_job_s"]))
    print(line("stage Job complete -> next stage Job", res["job_complete_to_next_job_s"]))
    print(line(f"burst of {args.burst}: CR created -> first Job", res["burst_cr_to_first_job_s"]))
    print(line(f"burst of {args.burst}: Job complete -> next Job", res["burst_job_complete_to_next_job_s"]))
    print(f"  burst: {args.burst} CRs posted in {res['burst_create_s']:.1f} s, all first Jobs after "
          f"{res['burst_all_first_jobs_s']:.1f} s; operator CPU {res['operator_cpu_s']:.1f} s; RSS peak "
          f"{res['operator_rss_peak_mb']:.0f} MB")
    n = sum(res["reconciles"].values())
    if n:
        print(f"  reconciles run: {n:.0f} ({', '.join(f'{k} {v:.0f}' for k, v in sorted(res['reconciles'].items()))});"
              f" operator CPU per reconcile {1000 * res['operator_cpu_s'] / n:.0f} ms")
    phases = res.get("reconcile_phases") or {}
    if phases:
        print("  reconcile phases, mean ms (total s): "
              + ", ".join(f"{k} {v['mean_ms']:.0f} ({v['total_s']:.0f})" for k, v in phases.items()))
    p95a, p95b = res["cr_to_first_job_s"]["p95"], res["job_complete_to_next_job_s"]["p95"]
    p95c = res["burst_job_complete_to_next_job_s"]["p95"]
    print("  " + goal_line("CR -> first Job p95 / 1 s goal", p95a / 1.0, 1.0, higher_is_better=False))
    print("  " + goal_line("Job complete -> next Job p95 / 2 s goal", p95b / 2.0, 1.0, higher_is_better=False))
    print("  " + goal_line(f"burst of {args.burst}: Job complete -> next Job p95 / 2 s goal", p95c / 2.0, 1.0,
                           higher_is_better=False))
    print("  " + goal_line("operator RSS peak / 300 MB goal", res["operator_rss_peak_mb"] / 300, 1.0,
                           higher_is_better=False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="operator latency and scale on the real control plane")
    p.add_argument("--pipelines", type=int, default=20)
    p.add_argument("--burst", type=int, default=100)
    p.add_argument("--sides", nargs="+", choices=("cache", "list"), default=["cache"],
                   help="operators to measure one after the other: cache (children from the watch streams, the "
                        "default) and/or list (listed per reconcile, as before the cache); give 'list cache' for a "
                        "same-run ratio")
    p.add_argument("--keep-log", action="store_true", help="print the operator log tail")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(args)
    report(res, args)
    emit({"bench": "operator", "pipelines": args.pipelines, "burst": args.burst, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
