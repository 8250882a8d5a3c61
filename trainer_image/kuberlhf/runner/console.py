"""What ``kuberlhf run`` prints: stage banners, timings, the closing how-to-chat note."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from kuberlhf.contract.spec import RLHFPipeline


def format_duration(seconds: float) -> str:
    """75.2 -> '1m15s'; 3.4 -> '3.4s'; 3725 -> '1h02m05s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Console:
    """Plain lines on stdout; bold/colour only on a terminal (CI logs stay clean)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.color = hasattr(self.stream, "isatty") and self.stream.isatty()

    def _style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def header(self, text: str) -> None:
        self.line()
        self.line(self._style(f"== {text}", "1"))

    def info(self, text: str) -> None:
        self.line(f"   {text}")

    def warn(self, text: str) -> None:
        self.line(self._style(f"!! {text}", "33"))

    def error(self, text: str) -> None:
        print(self._style(f"error: {text}", "31"), file=sys.stderr, flush=True)

    def stage_start(self, title: str, detail: str) -> None:
        self.line()
        self.line(self._style(f">> {title}", "1;36") + f"  ({detail})")

    def stage_skip(self, title: str, detail: str) -> None:
        self.line()
        self.line(self._style(f"-- {title}: skipped", "1;90") + f"  ({detail})")

    def stage_done(self, title: str, detail: str) -> None:
        self.line(self._style(f"ok {title}", "1;32") + f"  {detail}")

    def finish(self, out: Path, elapsed: float, pipeline: RLHFPipeline) -> None:
        ema = pipeline.spec.final_ema_enabled and pipeline.spec.serving.use_ema
        model = out / pipeline.spec.final_stage.value / ("ema" if ema else "model")
        self.header(f"done in {format_duration(elapsed)}; outputs in {out}")
        if model.exists():
            self.info("chat with the final model:")
            self.info(f"  kuberlhf chat --model {model}")
            self.info(f"  kuberlhf serve --model {model} --port 8000   # OpenAI-compatible API + web page on :8000")
        self.info(f"metrics: {out / 'metrics.jsonl'}   plots: {out / 'plots'}   logs: {out / 'logs'}")
