"""``kuberlhf plan FILE``: the memory plan of a pipeline as a table a person can read, one row per model of each
stage plus the stage's total per GPU, whether it fits, and the scratch volume each node needs."""

from __future__ import annotations

from kuberlhf.planner.estimate import GiB, PipelinePlan


def _g(n: int) -> str:
    return f"{n / GiB:.1f}"


def params_text(n: int) -> str:
    """A parameter count as people write it: 1.32B, 125.2M, 41.0K (a tiny model is not "0.00B")."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{2 if suffix == 'B' else 1}f}{suffix}"
    return str(n)


def render(plan: PipelinePlan, shapes_note: str = "") -> str:
    head = ("stage", "model", "ZeRO", "params", "weights", "grads", "optim", "gathered", "GiB/GPU", "fits?")
    rows: list[tuple[str, ...]] = []
    for est in plan.stages:
        for m in est.models:
            kind = "trained" if m.trained else "frozen"
            extra = (f" +LoRA {m.lora / 1e6:.1f}M" if m.lora else "") + (" offload" if m.offload else "")
            rows.append(
                (
                    est.stage,
                    f"{m.role} ({kind}{extra})",
                    str(m.zero),
                    params_text(m.params),
                    _g(m.states.weights),
                    _g(m.states.gradients),
                    _g(m.states.optimizer),
                    _g(m.states.gathered),
                    _g(m.states.gpu),
                    "",
                )
            )
        for name, value in est.working.items():
            rows.append((est.stage, f"{name} (working)", "", "", "", "", "", "", _g(value), ""))
        rows.append((est.stage, "runtime reserve", "", "", "", "", "", "", _g(est.reserve), ""))
        hw = f"{est.nodes} x {est.gpus_per_node}"
        if est.gpu_memory is None:
            verdict = "not checked (cpu)"
        else:
            verdict = f"{'yes' if est.fits else 'NO'} on {hw} x {_g(est.gpu_memory)} GiB"
        rows.append((est.stage, "TOTAL per GPU", "", "", "", "", "", "", _g(est.per_gpu_bytes), verdict))
        rows.append(
            (
                est.stage,
                f"checkpoint {_g(est.checkpoint_bytes)} GiB, scratch/node {_g(est.scratch_bytes)} GiB",
                *[""] * 8,
            )
        )
        if est.cpu_offload_bytes_per_node:  # checked against the pod's memory limit (planner.check.host_problem)
            offload = f"CPU offload/node {_g(est.cpu_offload_bytes_per_node)} GiB"
            rows.append((est.stage, f"{offload}, host memory/pod {_g(est.host_bytes_per_pod)} GiB", *[""] * 8))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    last = None
    for r in rows:
        if last is not None and r[0] != last:
            lines.append("")
        last = r[0]
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if shapes_note:
        lines += ["", shapes_note]
    return "\n".join(lines)
