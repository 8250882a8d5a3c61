"""One 'rank' of the multi-process cache test: waits for the go file, then tokenises its SFT rows through the
shared cache and reports what it got (and whether it tokenised itself). Run as a script by test_cache.py. It
calls the cache layer directly (no torch import) to keep the test's start-up cheap."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    work, cache_dir, key, assets = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    from transformers import AutoTokenizer

    import kuberlhf.data.cache as cache
    from kuberlhf.contract.spec import DataSpec, Stage
    from kuberlhf.data import stage_rows

    calls = work / "encode-calls.log"
    real_encode = cache.encode_rows

    def counting_encode(*args, **kwargs):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # widen the window in which the other ranks arrive while this one works
        return real_encode(*args, **kwargs)

    cache.encode_rows = counting_encode
    tok = AutoTokenizer.from_pretrained(assets)
    rows, _ = stage_rows(DataSpec(datasets=["kuberlhf/synthetic-pairs"], max_samples=400), Stage.sft)
    (work / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not (work / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go file")
        time.sleep(0.01)
    ds = cache.tokenize_cached(rows, tok, "sft", 48, cache_dir=cache_dir, key=key, options={"mask": "human_turns"})
    digest = hashlib.sha256(json.dumps(ds[:]["labels"]).encode()).hexdigest()
    print(json.dumps({"pid": os.getpid(), "n": len(ds), "digest": digest}))


if __name__ == "__main__":
    main()
