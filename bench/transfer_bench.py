"""Checkpoint transfer through the real S3 server (SeaweedFS ``weed mini``) vs ``rclone`` through the same server
and a local ``cp`` + fsync.

Builds a checkpoint-like directory (a few large shards + many small files, incompressible bytes), then runs,
interleaved for ``--rounds`` rounds so load from other processes hits every side alike:

  cp      ``cp -r`` of the directory + ``sync`` (fsync) of every copied file: the disk baseline
  upload  ``ObjectStore.upload_dir`` (sha256 of every file, transfer manager upload, manifest, ``_COMPLETE``)
  download ``ObjectStore.download_dir`` (transfer manager download + size/sha256 verification)
  rclone-up / rclone-down  ``rclone copy`` of the same bytes to / from the same server (Debian's rclone, its
          defaults: 4 transfers, MD5 of every file checked against the server's after upload and download);
          the client a user would pick instead. Goal: our verified round trip >= 1.0x rclone's.

and prints MiB/s, each side's ratio to ``cp`` and to rclone, and where the time goes (per-phase seconds; CPU
seconds of the client (this process and its children: cp, sync, rclone) and of the weed server, per GiB).

  .venv/bin/python bench/transfer_bench.py                 # 1 GiB
  .venv/bin/python bench/transfer_bench.py --size-mb 300 --rounds 3
  .venv/bin/python bench/transfer_bench.py --size-mb 256 --sweep   # try TransferConfig variants
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from kuberlhf.storage import ObjectStore
from kuberlhf.storage.s3 import TransferTuning
from kuberlhf.storage.seaweed import SeaweedServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, goal_line  # noqa: E402 - bench/common.py: the result line every benchmark prints

MiB = 1 << 20
RCLONE_REMOTE = "kuberlhfbench"  # configured through RCLONE_CONFIG_<NAME>_* variables only: no config file


def make_checkpoint_tree(root: Path, size_mb: int, seed: int = 0) -> tuple[int, int]:
    """A HF/DeepSpeed-like checkpoint of about ``size_mb``: 4 model shards + 2 optimizer-state files carry the
    bytes; 200 small files (configs, tokenizer pieces, per-rank states) of 1-64 KiB. Returns (files, bytes)."""
    rng = random.Random(seed)
    small = {f"tokenizer/piece-{i:03d}.json": rng.randint(1 << 10, 64 << 10) for i in range(150)}
    small.update(
        {f"ckpt/global_step10/rank-{i:02d}_model_states.pt": rng.randint(1 << 10, 64 << 10) for i in range(50)}
    )
    small["config.json"] = 700
    large_total = max(size_mb * MiB - sum(small.values()), 6 * MiB)
    large = {f"model/model-{i + 1:05d}-of-00004.safetensors": large_total * 2 // 12 for i in range(4)}
    large.update({f"ckpt/global_step10/zero_pp_rank_{i}_optim_states.pt": large_total * 2 // 12 for i in range(2)})
    files = {**large, **small}
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 16 * MiB)
                f.write(rng.randbytes(n))
                left -= n
    return len(files), sum(files.values())


def cp_with_fsync(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    files = [str(p) for p in dst.rglob("*") if p.is_file()]
    for i in range(0, len(files), 500):
        subprocess.run(["sync", *files[i : i + 500]], check=True)  # coreutils sync FILE... fsyncs each file


def rclone_binary() -> str:
    found = shutil.which("rclone")
    if not found:
        raise SystemExit(
            "transfer_bench: rclone (the baseline) is not installed: apt-get install rclone, or pass --no-rclone"
        )
    return found


def rclone_env(server: SeaweedServer) -> dict[str, str]:
    name = RCLONE_REMOTE.upper()
    # no AWS_* either: the AWS SDK inside rclone would pick up e.g. AWS_CA_BUNDLE, which it cannot apply to its
    # own HTTP transport ("LoadCustomCABundleError"), and the keys are given below
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RCLONE_", "AWS_"))}
    env.update(
        {
            f"RCLONE_CONFIG_{name}_TYPE": "s3",
            f"RCLONE_CONFIG_{name}_PROVIDER": "SeaweedFS",
            f"RCLONE_CONFIG_{name}_ENDPOINT": server.endpoint,
            f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": server.access_key,
            f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": server.secret_key,
            f"RCLONE_CONFIG_{name}_REGION": server.region,
            "RCLONE_CONFIG": "/dev/null",
        }
    )
    return env


def rclone_copy(src: str, dst: str, env: dict[str, str]) -> None:
    subprocess.run([rclone_binary(), "copy", src, dst], check=True, env=env)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    """CPU of this process plus its reaped children (cp, sync)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class Sample:
    def __init__(self, name: str, seconds: float, nbytes: int, client_cpu: float, server_cpu: float, phases: dict):
        self.name, self.seconds, self.nbytes = name, seconds, nbytes
        self.client_cpu, self.server_cpu, self.phases = client_cpu, server_cpu, phases

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.seconds


def timed(name: str, nbytes: int, server: SeaweedServer, fn, store: ObjectStore | None = None) -> Sample:
    c0, s0, t0 = self_cpu_seconds(), proc_cpu_seconds(server.pid), time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    phases = dict(store.last_timings) if store is not None else {}
    return Sample(name, dt, nbytes, self_cpu_seconds() - c0, proc_cpu_seconds(server.pid) - s0, phases)


def run_rounds(
    server: SeaweedServer, store: ObjectStore, src: Path, work: Path, nbytes: int, rounds: int, rclone: bool
) -> dict:
    samples: dict[str, list[Sample]] = {"cp": [], "upload": [], "download": []}
    if rclone:
        samples.update({"rclone-up": [], "rclone-down": []})
        env = rclone_env(server)
    for r in range(rounds):
        dst, down, uri = work / f"cp-{r}", work / f"down-{r}", f"s3://bench/run-{r}"
        rc_remote, rc_down = f"{RCLONE_REMOTE}:bench/rclone-{r}", work / f"rclone-down-{r}"
        ours, theirs = ["upload", "download"], ["rclone-up", "rclone-down"] if rclone else []
        # alternate who goes first, so a load change mid-round hits both clients alike
        order = ["cp", *ours, *theirs] if r % 2 == 0 else [*theirs, *ours, "cp"]
        for side in order:
            if side == "cp":
                fn, st = (lambda dst=dst: cp_with_fsync(src, dst)), None
            elif side == "upload":
                fn, st = (lambda uri=uri: store.upload_dir(src, uri, producer="bench")), store
            elif side == "download":
                fn, st = (lambda uri=uri, d=down: store.download_dir(uri, d)), store
            elif side == "rclone-up":
                fn, st = (lambda rem=rc_remote: rclone_copy(str(src), rem, env)), None
            else:
                fn, st = (lambda rem=rc_remote, d=rc_down: rclone_copy(rem, str(d), env)), None
            samples[side].append(timed(side, nbytes, server, fn, st))
        for d in (dst, down, rc_down):
            shutil.rmtree(d, ignore_errors=True)
        store.delete_prefix(uri)
        store.delete_prefix(f"s3://bench/rclone-{r}")
    return samples


def median_sample(samples: list[Sample]) -> Sample:
    return sorted(samples, key=lambda s: s.seconds)[len(samples) // 2]


def report(samples: dict, nbytes: int, nfiles: int, tuning: TransferTuning) -> dict:
    cp, up, down = (median_sample(samples[k]) for k in ("cp", "upload", "download"))
    theirs = [median_sample(samples[k]) for k in ("rclone-up", "rclone-down") if k in samples]
    print(f"\ncheckpoint: {nfiles} files, {nbytes / MiB:.0f} MiB; rounds: {len(samples['cp'])} (median shown)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"{'side':10s} {'seconds':>8s} {'MiB/s':>8s} {'vs cp':>6s} {'client CPU s':>12s} {'weed CPU s':>10s}  phases (s)"
    )
    for s in (cp, up, down, *theirs):
        phases = " ".join(f"{k}={v:.2f}" for k, v in s.phases.items())
        print(
            f"{s.name:10s} {s.seconds:8.2f} {s.mib_s:8.1f} {s.mib_s / cp.mib_s:6.2f} {s.client_cpu:12.2f} "
            f"{s.server_cpu:10.2f}  {phases}"
        )
    round_trip = 2 * cp.seconds / (up.seconds + down.seconds)
    print(goal_line("round trip (upload + download) vs two disk copies", round_trip, 0.8))
    vs_rclone = None
    if theirs:
        vs_rclone = (theirs[0].seconds + theirs[1].seconds) / (up.seconds + down.seconds)
        print(goal_line("verified round trip vs rclone's (same bytes, same server)", vs_rclone, 1.0))
    result = {
        "bench": "transfer",
        "bytes": nbytes,
        "files": nfiles,
        "cp_mib_s": round(cp.mib_s, 1),
        "upload_mib_s": round(up.mib_s, 1),
        "download_mib_s": round(down.mib_s, 1),
        "upload_vs_cp": round(up.mib_s / cp.mib_s, 3),
        "download_vs_cp": round(down.mib_s / cp.mib_s, 3),
        "round_trip_vs_cp": round(round_trip, 3),
        "round_trip_vs_rclone": round(vs_rclone, 3) if vs_rclone else None,
        "tuning": tuning.__dict__,
        "all_seconds": {k: [round(s.seconds, 3) for s in v] for k, v in samples.items()},
        "cpu_s_per_gib": {
            s.name: {
                "client": round(s.client_cpu * (1 << 30) / nbytes, 2),
                "weed": round(s.server_cpu * (1 << 30) / nbytes, 2),
            }
            for s in (cp, up, down, *theirs)
        },
        "loadavg": round(os.getloadavg()[0], 1),
    }
    emit(result)
    return result


def sweep(server: SeaweedServer, src: Path, work: Path, nbytes: int, base: TransferTuning) -> None:
    """Upload + download throughput and CPU cost for TransferConfig variants (one run each). The CPU columns
    are seconds per GiB: less sensitive than MiB/s to load from other processes."""
    variants = [replace(base, multipart_threshold=1 << 40, max_concurrency=n) for n in (4, 16)]  # no multipart
    variants += [
        replace(base, multipart_chunksize=c * MiB, multipart_threshold=c * MiB, max_concurrency=n)
        for c in (8, 32, 64)
        for n in (4, 16)
    ]
    gib = nbytes / (1 << 30)
    print(
        f"{'chunk MiB':>9s} {'conc':>4s} {'up MiB/s':>9s} {'cli CPU/GiB':>11s} {'weed CPU/GiB':>12s} "
        f"{'down MiB/s':>10s} {'cli CPU/GiB':>11s} {'weed CPU/GiB':>12s}"
    )
    for i, tuning in enumerate(variants):
        store = ObjectStore.from_uri(
            "s3://bench", endpoint=server.endpoint, env=server.credentials_env(), tuning=tuning
        )
        uri = f"s3://bench/sweep-{i}"
        up = timed("upload", nbytes, server, lambda uri=uri, s=store: s.upload_dir(src, uri, producer="bench"), store)
        down = timed("download", nbytes, server, lambda uri=uri, s=store: s.download_dir(uri, work / "sweep"), store)
        chunk = "single" if tuning.multipart_threshold > nbytes else str(tuning.multipart_chunksize // MiB)
        print(
            f"{chunk:>9s} {tuning.max_concurrency:4d} {up.mib_s:9.1f} {up.client_cpu / gib:11.2f} "
            f"{up.server_cpu / gib:12.2f} {down.mib_s:10.1f} {down.client_cpu / gib:11.2f} {down.server_cpu / gib:12.2f}",
            flush=True,
        )
        shutil.rmtree(work / "sweep", ignore_errors=True)
        store.delete_prefix(uri)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="checkpoint size in MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    ap.add_argument("--workdir", type=Path, default=None, help="where the tree, copies and server data go")
    ap.add_argument("--chunk-mb", type=int, default=None, help="multipart chunk size")
    ap.add_argument("--threshold-mb", type=int, default=None, help="multipart threshold")
    ap.add_argument("--concurrency", type=int, default=None, help="transfer manager threads")
    ap.add_argument("--io-chunk-kb", type=int, default=None, help="download read size")
    ap.add_argument("--weed-arg", action="append", default=[], help="extra `weed mini` flag, e.g. -filer.maxMB=16")
    ap.add_argument("--sweep", action="store_true", help="also try chunk size x concurrency variants")
    ap.add_argument("--no-rclone", action="store_true", help="leave out the rclone baseline")
    args = ap.parse_args(argv)

    tuning = TransferTuning()
    if args.chunk_mb:
        tuning = replace(tuning, multipart_chunksize=args.chunk_mb * MiB)
    if args.threshold_mb:
        tuning = replace(tuning, multipart_threshold=args.threshold_mb * MiB)
    if args.concurrency:
        tuning = replace(tuning, max_concurrency=args.concurrency)
    if args.io_chunk_kb:
        tuning = replace(tuning, io_chunksize=args.io_chunk_kb << 10)

    if not args.no_rclone:
        rclone_binary()  # before any work: a missing baseline is a setup error
    work = Path(tempfile.mkdtemp(prefix="kuberlhf-transfer-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        nfiles, nbytes = make_checkpoint_tree(work / "src", args.size_mb)
        print(f"built {nfiles} files, {nbytes / MiB:.0f} MiB in {time.perf_counter() - t0:.1f}s", flush=True)
        with SeaweedServer(work / "seaweed", extra_args=args.weed_arg) as server:
            server.create_bucket("bench")
            store = ObjectStore.from_uri(
                "s3://bench", endpoint=server.endpoint, env=server.credentials_env(), tuning=tuning
            )
            samples = run_rounds(server, store, work / "src", work, nbytes, args.rounds, not args.no_rclone)
            report(samples, nbytes, nfiles, tuning)
            if args.sweep:
                sweep(server, work / "src", work, nbytes, tuning)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
