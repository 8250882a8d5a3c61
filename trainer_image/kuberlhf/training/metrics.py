"""metrics.jsonl (one JSON object per line: stage, step, split, time, values) and optional TensorBoard
scalars. Only rank 0 writes; other ranks get a writer that does nothing."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def metric_record(stage: str, step: int, split: str, values: dict[str, Any], now: float | None = None
                  ) -> dict[str, Any]:
    """The line written for one measurement; non-finite floats become null (JSON has no NaN)."""
    rec: dict[str, Any] = {"stage": stage, "step": int(step), "split": split, "time": now or time.time()}
    for k, v in values.items():
        if v is None:
            continue
        v = float(v) if not isinstance(v, (int, str, bool)) else v
        rec[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return rec


class MetricsWriter:
    def __init__(self, path: Path, stage: str, enabled: bool = True, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        self.stage = stage
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines from steps after the checkpoint (they will be measured again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, step: int, split: str, **values: Any) -> dict[str, Any]:
        rec = metric_record(self.stage, step, split, values)
        if not self.enabled:
            return rec
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("stage", "step", "split", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{self.stage}/{split}/{k}", v, step)
            self._tb.flush()
        return rec

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
