"""Metrics merging/summaries and the PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

from kuberlhf.runner.console import format_duration
from kuberlhf.runner.metrics import merge_metrics, parse_jsonl, series, summarize_stage, to_jsonl
from kuberlhf.runner.plots import moving_average, write_plots


def fake_records() -> list[dict]:
    recs = []
    for s in range(1, 41):
        recs.append({"stage": "sft", "step": s, "split": "train", "time": s, "loss": 6 * math.exp(-s / 20), "lr": 1e-3})
    recs.append({"stage": "sft", "step": 40, "split": "eval", "time": 41, "loss": 2.5, "perplexity": 12.2})
    for s in range(1, 21):
        recs.append({"stage": "reward", "step": s, "split": "train", "time": 100 + s, "loss": 0.7 - s / 40})
    recs.append({"stage": "reward", "step": 20, "split": "eval", "time": 130, "accuracy": 0.8,
                 "chosen_score": 1.2, "rejected_score": -0.4})
    for s in range(1, 31):
        recs.append({"stage": "ppo", "step": s, "split": "train", "time": 200 + s, "reward": -1 + s / 15,
                     "kl": s / 100, "actor_loss": 0.1 / s, "critic_loss": 1 / s, "ptx_loss": 3.0, "return": s / 20,
                     "true_reward": 0.5 + s / 60})
    return recs


def test_parse_skips_torn_lines() -> None:
    text = '{"stage": "sft", "step": 1, "loss": 2}\n{"stage": "sft", "st\n\n'
    assert parse_jsonl(text) == [{"stage": "sft", "step": 1, "loss": 2}]


def test_merge_orders_stages_and_keeps_latest_duplicate() -> None:
    ppo = [{"stage": "ppo", "step": 1, "time": 5, "reward": 0.0}, {"stage": "ppo", "step": 1, "time": 9, "reward": 1.0}]
    sft = [{"stage": "sft", "step": 2, "time": 1, "loss": 1.0}, {"stage": "sft", "step": 1, "time": 0, "loss": 2.0}]
    merged = merge_metrics([ppo, sft])
    assert [(r["stage"], r["step"]) for r in merged] == [("sft", 1), ("sft", 2), ("ppo", 1)]
    assert merged[-1]["reward"] == 1.0  # a resumed attempt's record replaces the first attempt's
    assert parse_jsonl(to_jsonl(merged)) == merged


def test_summaries() -> None:
    recs = fake_records()
    assert "eval accuracy 80.0%" in summarize_stage(recs, "reward")
    assert summarize_stage(recs, "sft").startswith("40 steps, loss")
    assert "reward -0.933 -> +1.000" in summarize_stage(recs, "ppo")
    assert "true reward 0.517 -> 1.000" in summarize_stage(recs, "ppo")
    assert summarize_stage([], "ppo") == "no metrics recorded"
    assert series(recs, "sft", "perplexity", "eval") == ([40], [12.2])


def test_moving_average_and_durations() -> None:
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert format_duration(3.44) == "3.4s"
    assert format_duration(75.2) == "1m15s"
    assert format_duration(3725) == "1h02m05s"


def test_plots_are_readable_pngs(tmp_path: Path) -> None:
    from PIL import Image

    paths = write_plots(fake_records(), tmp_path)
    assert sorted(p.name for p in paths) == ["ppo.png", "reward_model.png", "sft_loss.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.size[0] >= 700 and im.size[1] >= 400
            # a blank canvas would have a handful of colours; lines, text and legends give many
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


def test_ppo_plot_has_a_true_reward_panel_when_the_data_provides_one(tmp_path: Path) -> None:
    """The true-reward panel is drawn from the records' true_reward; without it the panel says 'no data'."""
    import matplotlib

    from kuberlhf.runner import plots

    matplotlib.use("Agg")
    drawn: list[str] = []
    real_line = plots._line

    def spy(ax, steps, values, label, color, smooth=True):
        if values:
            drawn.append(label)
        return real_line(ax, steps, values, label, color, smooth)

    plots._line = spy
    try:
        plots.plot_ppo(fake_records(), tmp_path / "with.png")
        with_truth = list(drawn)
        drawn.clear()
        plots.plot_ppo([{k: v for k, v in r.items() if k != "true_reward"} for r in fake_records()],
                       tmp_path / "without.png")
    finally:
        plots._line = real_line
    assert "true reward" in with_truth and "true reward" not in drawn
