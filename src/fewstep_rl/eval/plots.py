"""Curves of a run: every evaluated metric against iterations, from ``eval.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(run_dir: Path, keys: tuple[str, ...] = ("reward/", "gold", "energy_teacher", "energy_tilted")) -> Path | None:
    """Write ``reward_curve.png``: one panel per metric whose name starts with one of ``keys``."""
    path = Path(run_dir) / "eval.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    names = sorted({k for r in rows for k in r if k != "iteration" and k.startswith(keys) and "floor" not in k})
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(r["iteration"], r[name]) for r in rows if name in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out = Path(run_dir) / "reward_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
