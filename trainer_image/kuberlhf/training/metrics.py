"""metrics.jsonl (one JSON object per line: stage, step, split, time, values) and optional TensorBoard
scalars (tag ``<stage>/<split>/<key>``, e.g. ``sft/train/loss``, at the optimizer step). Only rank 0 writes;
other ranks get a writer that does nothing.

metrics.jsonl is the record; the TensorBoard events mirror it. When a resumed run cuts the file back to its
checkpoint, the events are rewritten from the file, so a resumed stage shows every step once."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any


def tensorboard_scalars(rec: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every numeric value of a metrics line; null (non-finite) values are left out."""
    stage, split, step = rec.get("stage", ""), rec.get("split", "train"), int(rec.get("step", 0))
    return [(f"{stage}/{split}/{k}", float(v), step) for k, v in rec.items()
            if k not in ("stage", "step", "split", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)]


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
        self.tensorboard_dir = Path(tensorboard_dir) if (enabled and tensorboard_dir is not None) else None
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open_tensorboard()

    def _open_tensorboard(self) -> None:
        if self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tensorboard_dir))

    def _rewrite_tensorboard(self) -> None:
        """Replace the event files with the scalars of metrics.jsonl as it is now."""
        if self.tensorboard_dir is None:
            return
        self.close()
        shutil.rmtree(self.tensorboard_dir, ignore_errors=True)
        self._open_tensorboard()
        if self.path.exists():
            for rec in read_metrics(self.path):
                self._add_scalars(rec)
            self._tb.flush()

    def reset(self) -> None:
        """A fresh start: no metrics, no events (a resume restores them from the checkpoint)."""
        if not self.enabled:
            return
        self.path.unlink(missing_ok=True)
        self._rewrite_tensorboard()

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines from steps after the checkpoint (they will be measured again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))
        self._rewrite_tensorboard()

    def _add_scalars(self, rec: dict[str, Any]) -> None:
        for tag, value, step in tensorboard_scalars(rec):
            self._tb.add_scalar(tag, value, step)

    def write(self, step: int, split: str, **values: Any) -> dict[str, Any]:
        rec = metric_record(self.stage, step, split, values)
        if not self.enabled:
            return rec
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            self._add_scalars(rec)
            self._tb.flush()
        return rec

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
