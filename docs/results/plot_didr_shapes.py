"""Plot proxy and gold against training steps for the DIDR / DI* / ReFL shapes runs (issue 7), one PNG.

    python docs/results/plot_didr_shapes.py runs/didr runs/di_star runs/refl [more runs ...] \
        --labels DIDR DI* ReFL [...] --out docs/results/didr_shapes.png

Runs sharing a label (several seeds) are drawn in one colour and pooled for that label's line.

Each run directory holds the ``eval.jsonl`` written by ``fewstep-rl fit`` (evaluation of the EMA generator on the
fixed evaluation prompts; ``reward/proxy`` is the training reward, ``gold`` the exact verifier). Panels: proxy vs
step, gold vs step, and gold against proxy gain (the reward-hacking view: at equal proxy gain, higher gold = less
hacking). Single evaluations are noisy (256 samples: standard error ≈ 0.015 on gold), so the comparison at equal
proxy gain uses a least-squares line gold = a + b·gain per run, printed at the gains every run reaches (with the
line's standard error) and drawn dashed in the third panel.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["iteration"])


def fit_line(gain: list[float], gold: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Least squares ``gold = a + b·gain``: coefficients and their covariance (residual variance × (XᵀX)⁻¹)."""
    x = np.stack([np.ones(len(gain)), np.asarray(gain)], 1)
    y = np.asarray(gold)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = max(len(y) - 2, 1)
    s2 = float(((y - x @ coef) ** 2).sum()) / dof
    return coef, s2 * np.linalg.inv(x.T @ x)


def predict(coef: np.ndarray, cov: np.ndarray, g: float) -> tuple[float, float]:
    v = np.array([1.0, g])
    return float(v @ coef), float(np.sqrt(v @ cov @ v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories with eval.jsonl")
    ap.add_argument("--labels", nargs="*", help="one label per run (default: directory names)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/didr_shapes.png"))
    args = ap.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"{len(args.runs)} runs but {len(labels)} labels")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    pooled: dict[str, tuple[list[float], list[float]]] = {}
    colors: dict[str, str] = {}
    for run, label in zip(args.runs, labels):
        rows = load(run)
        it = [r["iteration"] for r in rows]
        proxy = [r["reward/proxy"] for r in rows]
        gold = [r["gold"] for r in rows]
        gain = [p - proxy[0] for p in proxy]
        kw = {"color": colors[label]} if label in colors else {"label": label}
        (line,) = axes[0].plot(it, proxy, marker="o", ms=3, **kw)
        colors.setdefault(label, line.get_color())
        axes[1].plot(it, gold, marker="o", ms=3, color=colors[label])
        axes[2].plot(gain, gold, marker="o", ms=3, color=colors[label], alpha=0.8)
        pooled.setdefault(label, ([], []))[0].extend(gain)
        pooled[label][1].extend(gold)
        print(f"{label} ({run}): proxy {proxy[0]:.3f} -> {proxy[-1]:.3f}, gold {gold[0]:.3f} -> {gold[-1]:.3f} "
              f"(iteration {it[-1]})")
    fits, top = [], []
    for label, (gain, gold) in pooled.items():
        coef, cov = fit_line(gain, gold)
        fits.append((label, coef, cov))
        top.append(max(gain))
        xs = np.linspace(0, max(gain), 20)
        axes[2].plot(xs, coef[0] + coef[1] * xs, ls="--", lw=1.5, color=colors[label])
        print(f"{label}: line gold = {coef[0]:.3f} + {coef[1]:.2f}·gain ({len(gain)} evaluations)")
    common = min(top)
    print(f"gold at equal proxy gain (least-squares line ± its standard error), gains up to {common:.3f}:")
    for g in (common / 3, 2 * common / 3, common):
        cells = [f"{label} {predict(c, v, g)[0]:.3f}±{predict(c, v, g)[1]:.3f}" for label, c, v in fits]
        print(f"  gain {g:.3f}: " + ", ".join(cells))
    axes[0].set(xlabel="training iteration", ylabel="proxy reward (training reward)", title="proxy")
    axes[1].set(xlabel="training iteration", ylabel="gold (exact verifier)", title="gold")
    axes[2].set(xlabel="proxy gain over init", ylabel="gold", title="gold at equal proxy gain")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[2].set_xlabel("proxy gain over init (dashed: least-squares line)")
    fig.suptitle("shapes, training reward = proxy; EMA generator, 4 steps, 256 eval prompts")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
