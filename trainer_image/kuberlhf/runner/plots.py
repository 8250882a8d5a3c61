"""PNG plots of a run's metrics (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kuberlhf.runner.metrics import Record, series


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (same length as the input)."""
    out: list[float] = []
    acc = 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _line(ax, steps, values, label: str, color: str, smooth: bool = True) -> bool:
    if not values:
        return False
    if smooth and len(values) >= 8:
        window = max(3, len(values) // 10)
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1, label=f"{label} (per step)")
        ax.plot(steps, moving_average(values, window), color=color, linewidth=2,
                label=f"{label} ({window}-step mean)")
    else:
        ax.plot(steps, values, color=color, marker="o" if len(values) < 30 else None, linewidth=1.5, label=label)
    return True


def _finish(ax, title: str, ylabel: str, xlabel: str = "optimizer step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=ax.transAxes, color="gray")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # figures are kept by pyplot until closed
    return path


def plot_sft(records: Sequence[Record], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, *series(records, "sft", "loss"), "train loss", "tab:blue")
    steps, vals = series(records, "sft", "loss", "eval")
    if vals:
        ax.plot(steps, vals, "s--", color="tab:orange", label="held-out loss")
    _finish(ax, "Step 1 - supervised fine-tuning: next-token loss", "cross-entropy loss (nats/token)")
    return _save(fig, path)


def plot_reward(records: Sequence[Record], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_score) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps, acc = series(records, "reward", "accuracy", "eval")
    if acc:
        ax_acc.plot(steps, [100 * a for a in acc], "o-", color="tab:green", label="held-out accuracy")
        ax_acc.axhline(50, color="gray", linestyle=":", label="chance (50%)")
        ax_acc.set_ylim(0, 100)
    tsteps, tacc = series(records, "reward", "accuracy")
    if tacc:
        _line(ax_acc, tsteps, [100 * a for a in tacc], "train accuracy", "tab:olive")
    _finish(ax_acc, "Step 2 - reward model: chosen ranked above rejected", "accuracy (%)")
    steps, chosen = series(records, "reward", "chosen_score", "eval")
    steps_r, rejected = series(records, "reward", "rejected_score", "eval")
    if chosen:
        ax_score.plot(steps, chosen, "o-", color="tab:blue", label="chosen answers")
    if rejected:
        ax_score.plot(steps_r, rejected, "o-", color="tab:red", label="rejected answers")
    _line(ax_score, *series(records, "reward", "loss"), "train pairwise loss", "tab:gray")
    _finish(ax_score, "Step 2 - mean reward score on held-out pairs", "score / loss")
    return _save(fig, path)


def plot_ppo(records: Sequence[Record], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    panels = [
        ("reward", "Mean reward-model score of generated answers", "RM score", "tab:green"),
        ("true_reward", "True reward of generated answers (data.trueReward)", "true reward [0, 1]", "tab:cyan"),
        ("kl", "KL divergence from the reference (SFT) policy", "KL (nats/sequence)", "tab:purple"),
        ("return", "Mean return (KL-shaped reward)", "return", "tab:olive"),
        ("actor_loss", "Actor (policy) loss", "clipped PPO loss", "tab:blue"),
        ("critic_loss", "Critic (value) loss", "clipped value loss", "tab:red"),
        ("ptx_loss", "Pre-training (ptx) loss", "cross-entropy loss", "tab:brown"),
        ("answer_len", "Mean answer length", "tokens", "tab:gray"),
    ]
    for ax, (key, title, ylabel, color) in zip(axes.flat, panels, strict=True):
        _line(ax, *series(records, "ppo", key), key.replace("_", " "), color)
        _finish(ax, title, ylabel)
    fig.suptitle("Step 3 - PPO with EMA and mixed pre-training loss", fontsize=14)
    return _save(fig, path)


def plot_panels(records: Sequence[Record], stage: str, panels: Sequence[tuple[str, str, str, str]], title: str,
                path: Path, split: str = "train") -> Path:
    """One figure of ``(metric, title, y label, colour)`` panels of a stage, two rows."""
    import matplotlib.pyplot as plt

    cols = (len(panels) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8))
    for ax, (key, panel_title, ylabel, color) in zip(axes.flat, panels, strict=False):
        _line(ax, *series(records, stage, key, split), key.replace("_", " "), color)
        _finish(ax, panel_title, ylabel)
    fig.suptitle(title, fontsize=14)
    return _save(fig, path)


DPO_PANELS = (
    ("loss", "DPO loss", "-log sigmoid(beta * margin)", "tab:blue"),
    ("reward_accuracy", "Pairs whose chosen answer gets the higher implicit reward", "share", "tab:green"),
    ("chosen_reward", "Implicit reward of the chosen answers", "beta * (log pi - log ref)", "tab:olive"),
    ("rejected_reward", "Implicit reward of the rejected answers", "beta * (log pi - log ref)", "tab:red"),
)
GRPO_PANELS = (
    ("reward", "Mean reward of sampled answers (reward model or rewardFunction)", "reward", "tab:green"),
    ("true_reward", "True reward of generated answers (data.trueReward)", "true reward [0, 1]", "tab:cyan"),
    ("kl", "KL to the reference (SFT) policy (k3 estimate)", "KL (nats/token)", "tab:purple"),
    ("policy_loss", "Clipped policy loss", "loss", "tab:blue"),
    ("ptx_loss", "Pre-training (ptx) loss", "cross-entropy loss", "tab:brown"),
    ("answer_len", "Mean answer length", "tokens", "tab:gray"),
)


def write_plots(records: Sequence[Record], out_dir: Path) -> list[Path]:
    """One PNG per stage that has metrics: sft_loss.png, reward_model.png, ppo.png, dpo.png, grpo.png."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = {r.get("stage") for r in records}
    made: list[Path] = []
    if "sft" in stages:
        made.append(plot_sft(records, out_dir / "sft_loss.png"))
    if "reward" in stages:
        made.append(plot_reward(records, out_dir / "reward_model.png"))
    if "ppo" in stages:
        made.append(plot_ppo(records, out_dir / "ppo.png"))
    if "dpo" in stages:
        made.append(plot_panels(records, "dpo", DPO_PANELS, "DPO on step 2's preference pairs", out_dir / "dpo.png"))
    if "grpo" in stages:
        made.append(plot_panels(records, "grpo", GRPO_PANELS, "GRPO with EMA and mixed pre-training loss",
                                out_dir / "grpo.png"))
    return made
