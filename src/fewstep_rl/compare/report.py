"""Outputs of a comparison: the side-by-side config table, ``results.csv``, ``results.md`` and ``report.html``.

``report.html`` is one self-contained page (every plot an inline PNG data URI, no external file): the results table
(one ``<tr data-method=LABEL>`` per run), the config differences, curves (training reward, judge, divergence per
monitor evaluation; the world's metrics per evaluation), two frontier plots (judge vs training-reward gain; training
reward vs divergence from the teacher — toy2d: the energy distance ``energy_teacher``; other worlds: the RMS distance
between a method's sample and the teacher's sample from the same noise), side-by-side sample grids per prompt from the
same noise, step time and peak memory. Each ``<img>`` reports its load into ``body[data-loaded]`` /
``body[data-broken]`` (used by the headless-browser test).

Departure from the issue text: the teacher distance for image worlds is the paired per-sample RMS distance to the
teacher's sample (a distance the compare defines for any world with pinned noise), since no world defines one yet.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from fewstep_rl.compare.config import flatten, value_sources

SKIP_KEYS = {"trainer.run_dir"}
MARK = {"preset": "ᵖ", "override": "ᵒ", "shared": "", "runner": "ʳ", "default": ""}


# ------------------------------------------------------------------------------------------------ config table
def config_table(specs: list) -> tuple[list[str], list[list[str]], list[bool]]:
    """(column labels, rows ``[key, value per run]``, per row: does it differ between runs)."""
    flats = [flatten(s.config()) for s in specs]
    sources = [value_sources(s) for s in specs]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys and k not in SKIP_KEYS]
    rows, differs = [], []
    for k in keys:
        vals = [json.dumps(f[k]) if k in f else "—" for f in flats]
        cells = [v + (MARK.get(src.get(k, ""), "") if v != "—" else "") for v, src in zip(vals, sources)]
        rows.append([k, *cells])
        differs.append(len(set(vals)) > 1)
    return [s.label for s in specs], rows, differs


def side_by_side(specs: list, width: int = 14) -> str:
    """The resolved configs side by side: keys that differ between runs first, marked ``≠``; then the shared ones.

    Cell marks: ``ᵖ`` the value comes from the method's preset, ``ᵒ`` from the entry's own overrides, ``ʳ`` set by the
    runner (iteration cap, seed, threads); unmarked: the compare file's shared parts or the dataclass default.
    """
    labels, rows, differs = config_table(specs)
    kw = max([len(r[0]) for r in rows] + [10]) + 2

    def cut(s: str) -> str:
        return s if len(s) <= width else s[: width - 1] + "…"

    head = "  " + "key".ljust(kw) + "".join(cut(lab).ljust(width + 1) for lab in labels)
    lines = ["per-method resolved configs (≠ differs between methods; ᵖ preset, ᵒ method override, ʳ runner)", head]
    order = [r for r, d in zip(rows, differs) if d and "—" not in r[1:]]  # keys every method has first
    order += [r for r, d in zip(rows, differs) if d and "—" in r[1:]]
    lines += ["≠ " + r[0].ljust(kw) + "".join(cut(c).ljust(width + 1) for c in r[1:]) for r in order]
    same = [r for r, d in zip(rows, differs) if not d]
    if same:
        lines.append(f"  shared by every method ({len(same)} keys): " + ", ".join(f"{r[0]}={r[1]}" for r in same))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ collection
def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def _json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


def teacher_reference(cfg: Any, specs: list) -> dict[str, Any] | None:
    """The teacher's pinned-noise samples and scores on the shared evaluation prompts (Euler, teacher guidance)."""
    from fewstep_rl.eval.generate import cycle_prompts, generate
    from fewstep_rl.eval.paired import paired_samples, score_per_sample
    from fewstep_rl.run import _multi_reward
    from fewstep_rl.sampling import Transition, sigma_grid

    spec = specs[0]
    r = spec.resolved
    world = r.world_cls(r.world)
    backbone = world.build_backbone().eval()
    prompts = cycle_prompts(cfg.eval.prompts or world.eval_prompts, cfg.eval.samples)
    sig = sigma_grid(cfg.eval.teacher_steps)

    def gen(p: Any, g: Any, s: Any) -> Any:
        return generate(backbone, "teacher", p, g, sig, Transition("euler"), float(world.teacher_guidance))

    with torch.no_grad():
        x = paired_samples(gen, prompts, cfg.eval.seed)
        out = {"samples": x.float().cpu(), "prompts": prompts, "world": world,
               "train": score_per_sample(_multi_reward(r.rewards, world), world, x, prompts) if r.rewards else {},
               "judge": score_per_sample(_multi_reward(r.judges, world), world, x, prompts) if r.judges else {}}
        out["metrics"] = world.evaluate(x, prompts) if hasattr(world, "evaluate") else {}
    return out


def _total(scores: dict[str, torch.Tensor], specs: list[tuple[str, type, Any, float]]) -> torch.Tensor | None:
    if not scores:
        return None
    w = {n: wt for n, _, _, wt in specs}
    return sum(w.get(k, 1.0) * v for k, v in scores.items())


def collect(cfg: Any, specs: list, out: Path, teacher: dict | None) -> list[dict[str, Any]]:
    """One result row per run (plus the teacher's first when given)."""
    from fewstep_rl.eval.paired import mean_se, paired_difference

    rows = []
    t_train = _total(teacher["train"], specs[0].resolved.rewards) if teacher else None
    t_judge = _total(teacher["judge"], specs[0].resolved.judges) if teacher else None
    if teacher:
        row: dict[str, Any] = {"label": "teacher", "method": f"teacher ({cfg.eval.teacher_steps}-step Euler)",
                               "status": "reference"}
        for tag in ("train", "judge"):
            for k, v in teacher[tag].items():
                row[f"{tag}/{k}"], row[f"{tag}/{k} se"] = mean_se(v)
        row["teacher_distance"] = 0.0
        rows.append(row)
    for spec in specs:
        d = out / spec.label
        done, final = _json(d / "done.json"), _json(d / "final_metrics.json")
        row = {"label": spec.label, "method": spec.entry.name, "seed": spec.seed,
               "status": "done" if done else "failed"}
        for k in ("iterations", "train_seconds", "train_samples", "step_time_ms", "peak_memory_mb", "alarm"):
            row[k] = done.get(k)
        mon = _jsonl(d / "monitor.jsonl")
        if mon:
            row["max_divergence"] = max(m["divergence"] for m in mon)
        best = _json(d / "best.json")
        if best:
            row["best_judge"], row["best_iteration"] = best["judge_total"], best["iteration"]
        fp = d / "final.pt"
        if fp.is_file():
            fin = torch.load(fp, weights_only=False)
            for tag in ("train", "judge"):
                for k, v in fin[tag].items():
                    row[f"{tag}/{k}"], row[f"{tag}/{k} se"] = mean_se(v)
            if teacher:
                for tag, tt, rs in (("train", t_train, spec.resolved.rewards), ("judge", t_judge, spec.resolved.judges)):
                    tot = _total(fin[tag], rs)
                    if tot is not None and tt is not None:
                        row[f"{tag}_gain"], row[f"{tag}_gain se"] = paired_difference(tot, tt)
                row["teacher_distance"] = teacher_distance(fin["samples"], teacher, final)
        for k, v in final.items():
            if not k.startswith("reward/") and isinstance(v, (int, float)):
                row[f"world/{k}"] = v
        rows.append(row)
    return rows


def teacher_distance(samples: torch.Tensor, teacher: dict, final: dict) -> float:
    """toy2d (``energy_teacher`` in the final metrics): that energy distance; else the RMS distance between each
    sample and the teacher's sample from the same noise, averaged over samples."""
    if "energy_teacher" in final:
        return float(final["energy_teacher"])
    a, b = samples.flatten(1).double(), teacher["samples"].flatten(1).double()
    return float(((a - b) ** 2).mean(1).sqrt().mean())


# ------------------------------------------------------------------------------------------------ tables
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


FIRST = ("label", "method", "status", "seed")
LATER = ("iterations", "train_seconds", "train_samples", "step_time_ms", "peak_memory_mb")


def table_columns(rows: list[dict]) -> list[str]:
    """Identity, then judges and gains, training rewards, teacher distance and monitor columns, then cost, then the
    world's own metrics."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def rank(c: str) -> tuple[int, int]:
        base = c[:-3] if c.endswith(" se") else c
        if base in FIRST:
            return 0, FIRST.index(base)
        if base.startswith("world/"):
            return 4, 0
        if base in LATER:
            return 3, LATER.index(base)
        order = ("judge/", "judge_gain", "train/", "train_gain", "teacher_distance", "alarm", "max_divergence", "best_")
        return 1, next((i for i, o in enumerate(order) if base.startswith(o)), len(order))

    return sorted(cols, key=lambda c: rank(c))


def write_csv(rows: list[dict], path: Path) -> None:
    cols = table_columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})


def markdown_table(rows: list[dict]) -> str:
    """Main columns with ``± se`` merged into one cell."""
    cols = [c for c in table_columns(rows) if not c.endswith(" se") and not c.startswith("world/energy_noise")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = _fmt(r.get(c))
            if f"{c} se" in r and v:
                v += f" ± {r[f'{c} se']:.2g}"
            cells.append(v)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots
def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def _curves(plt, series: dict[str, list[dict]], keys: list[str]) -> str:
    """One panel per key: each run's ``(iteration, value)`` rows as a line; the figure as an embedded PNG."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.0), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for lab, rows in series.items():
            pts = [(r["iteration"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=lab)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _png(fig)

def curve_plots(specs: list, out: Path) -> dict[str, str]:
    """Monitor curves (training total, judge total, divergence) and world-metric curves, every method overlaid."""
    plt = _plt()
    figs = {}
    mons = {s.label: _jsonl(out / s.label / "monitor.jsonl") for s in specs}
    keys = [k for k in ("train_total", "judge_total", "divergence", "diversity", "dark_fraction", "edge_density",
                        "colour_entropy") if any(k in r for m in mons.values() for r in m)]
    if keys:
        figs["monitor curves (pinned noise; judge never seen by training)"] = _curves(plt, mons, keys)
    evals = {s.label: _jsonl(out / s.label / "eval.jsonl") for s in specs}
    ekeys = sorted({k for e in evals.values() for r in e for k in r
                    if k.startswith(("reward/", "energy_teacher", "energy_tilted", "gold")) and "floor" not in k})[:6]
    if ekeys:
        figs["evaluation curves (world metrics)"] = _curves(plt, evals, ekeys)
    return figs


def _symlog_if_spread(ax: Any, vals: list[float], axis: str) -> None:
    """A symmetric-log axis when one value dwarfs the rest (a diverged run must not flatten the others)."""
    mags = sorted(abs(v) for v in vals if v is not None)
    if len(mags) >= 3 and mags[-1] > 10 * max(mags[len(mags) // 2], 1e-12):
        lin = max(mags[len(mags) // 2], 1e-3)
        (ax.set_xscale if axis == "x" else ax.set_yscale)("symlog", linthresh=lin)


def frontier_plots(rows: list[dict]) -> dict[str, str]:
    """Judge vs training-reward gain; training reward (and judge) vs divergence from the teacher."""
    plt = _plt()
    figs = {}
    runs = [r for r in rows if r.get("status") == "done"]
    pts = [(r["train_gain"], r.get("judge_gain"), r["label"]) for r in runs if "train_gain" in r]
    if pts:
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.scatter([0], [0], marker="*", s=120, color="k", label="teacher")
        for x, y, lab in pts:
            yy = 0.0 if y is None else y
            ax.scatter([x], [yy])
            ax.annotate(lab, (x, yy), fontsize=7)
        _symlog_if_spread(ax, [x for x, _, _ in pts], "x")
        ax.set_xlabel("training-reward gain over the teacher (paired)", fontsize=8)
        ax.set_ylabel("judge gain over the teacher (paired)", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        figs["frontier: judge vs training-reward gain"] = _png(fig)
    key = next((k for k in (rows[0] if rows else {}) if k.startswith("train/") and not k.endswith(" se")), None)
    pts2 = [(r.get("teacher_distance"), r.get(key), r["label"]) for r in rows if key and r.get(key) is not None
            and r.get("teacher_distance") is not None]
    if pts2:
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        for x, y, lab in pts2:
            ax.scatter([x], [y], marker="*" if lab == "teacher" else "o", s=100 if lab == "teacher" else 30)
            ax.annotate(lab, (x, y), fontsize=7)
        _symlog_if_spread(ax, [x for x, _, _ in pts2], "x")
        _symlog_if_spread(ax, [y for _, y, _ in pts2], "y")
        ax.set_xlabel("divergence from the teacher", fontsize=8)
        ax.set_ylabel(key, fontsize=8)
        fig.tight_layout()
        figs["frontier: training reward vs divergence from the teacher"] = _png(fig)
    return figs


def sample_grids(cfg: Any, specs: list, out: Path, teacher: dict | None) -> dict[str, str]:
    """Per prompt: teacher and every method side by side, from the same noise (images: tiles; points: scatter)."""
    plt = _plt()
    sources: dict[str, dict] = {}
    if teacher:
        sources["teacher"] = teacher
    for s in specs:
        fp = out / s.label / "final.pt"
        if fp.is_file():
            sources[s.label] = torch.load(fp, weights_only=False)
    if not sources:
        return {}
    first = next(iter(sources.values()))
    prompts = list(dict.fromkeys(first["prompts"]))[: cfg.eval.grid_prompts]
    figs = {}
    k = cfg.eval.grid_per_prompt
    for p in prompts:
        n = len(sources)
        fig, axes = plt.subplots(1, n, figsize=(2.0 * n, 2.2), squeeze=False)
        for ax, (lab, src) in zip(axes[0], sources.items()):
            idx = [i for i, q in enumerate(src["prompts"]) if q == p]
            x = src["samples"][idx]
            if x.dim() == 4:
                tiles = x[:k].clamp(0, 1)
                cols = math.ceil(math.sqrt(len(tiles)))
                h, w = tiles.shape[-2:]
                canvas = torch.ones(3, cols * (h + 1), cols * (w + 1))
                for j, t in enumerate(tiles):
                    r, c = divmod(j, cols)
                    canvas[:, r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = t[:3]
                ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                pts = x.flatten(1).numpy()
                ax.scatter(pts[:, 0], pts[:, 1] if pts.shape[1] > 1 else pts[:, 0] * 0, s=2, alpha=0.5)
                ax.tick_params(labelsize=6)
            ax.set_title(lab, fontsize=8)
        if first["samples"].dim() != 4:  # one frame for every panel: the first source's range, widened 2x
            ref = first["samples"][[i for i, q in enumerate(first["prompts"]) if q == p]].flatten(1)
            lo, hi = ref.min(0).values, ref.max(0).values
            mid, half = (lo + hi) / 2, (hi - lo).clamp(min=1e-3)
            for ax, (lab, src) in zip(axes[0], sources.items()):
                x = src["samples"][[i for i, q in enumerate(src["prompts"]) if q == p]].flatten(1)
                ax.set_xlim(float(mid[0] - half[0]), float(mid[0] + half[0]))
                if x.shape[1] > 1:
                    ax.set_ylim(float(mid[1] - half[1]), float(mid[1] + half[1]))
                    outside = int(((x[:, :2] - mid[:2]).abs() > half[:2]).any(1).sum())
                else:
                    outside = int(((x[:, 0] - mid[0]).abs() > half[0]).sum())
                if outside:
                    ax.set_title(f"{lab}\n({outside}/{len(x)} outside)", fontsize=7)
        fig.suptitle(f"prompt: {p!r}" if p else "prompt: '' (unconditional)", fontsize=9)
        fig.tight_layout()
        figs[f"samples — {p!r}"] = _png(fig)
    return figs


def cost_plot(rows: list[dict]) -> dict[str, str]:
    runs = [r for r in rows if r.get("step_time_ms") is not None]
    if not runs:
        return {}
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.8))
    labels = [r["label"] for r in runs]
    axes[0].barh(labels, [r["step_time_ms"] for r in runs])
    axes[0].set_xlabel("median step time (ms)", fontsize=8)
    axes[1].barh(labels, [r["peak_memory_mb"] or 0 for r in runs])
    axes[1].set_xlabel("peak memory (MiB)", fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return {"step time and peak memory": _png(fig)}


# ------------------------------------------------------------------------------------------------ HTML
_SCRIPT = """
<script>
(function () {
  var imgs = document.images, loaded = 0, broken = 0, total = imgs.length;
  function mark() { document.body.dataset.loaded = loaded; document.body.dataset.broken = broken;
                    document.body.dataset.images = total; }
  for (var i = 0; i < imgs.length; i++) {
    (function (im) {
      function ok() { if (im.naturalWidth > 0) { im.dataset.ok = "1"; loaded++; } else { im.dataset.ok = "0"; broken++; } mark(); }
      if (im.complete) { ok(); } else { im.addEventListener("load", ok); im.addEventListener("error", function () { im.dataset.ok = "0"; broken++; mark(); }); }
    })(imgs[i]);
  }
  mark();
})();
</script>
"""


def _html_table(rows: list[dict], row_attr: bool = True) -> str:
    cols = [c for c in table_columns(rows) if not c.endswith(" se")]
    out = ["<table class='results'><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead>"]
    for r in rows:
        cells = []
        for c in cols:
            v = _fmt(r.get(c))
            if f"{c} se" in r and v:
                v += f" ± {r[f'{c} se']:.2g}"
            cells.append(f"<td>{html.escape(v)}</td>")
        attr = f" data-method='{html.escape(r['label'])}'" if row_attr else ""
        out.append(f"<tr{attr}>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _config_html(specs: list) -> str:
    """Keys every method has that differ (the comparable knobs), then — folded — keys only some methods have."""
    labels, rows, differs = config_table(specs)
    head = "<tr><th>key</th>" + "".join(f"<th>{html.escape(lab)}</th>" for lab in labels) + "</tr>"

    def tr(r: list[str]) -> str:
        return ("<tr class='differs'><td>≠ " + html.escape(r[0]) + "</td>"
                + "".join(f"<td>{html.escape(c)}</td>" for c in r[1:]) + "</tr>")

    common = [tr(r) for r, d in zip(rows, differs) if d and "—" not in r[1:]]
    own = [tr(r) for r, d in zip(rows, differs) if d and "—" in r[1:]]
    shared = ", ".join(f"{r[0]}={r[1]}" for r, d in zip(rows, differs) if not d)
    return (f"<p>≠: differs between methods; ᵖ from the method's preset, ᵒ the entry's override, ʳ set by the "
            f"runner; — the method has no such key.</p><table class='config'>{head}{''.join(common)}</table>"
            f"<details><summary>keys only some methods have ({len(own)})</summary><table class='config'>{head}"
            f"{''.join(own)}</table></details>"
            f"<details><summary>shared by every method</summary><p class='shared'>{html.escape(shared)}</p></details>")


def render_html(title: str, rows: list[dict], specs: list, figs: dict[str, dict[str, str]], notes: str) -> str:
    css = ("body{font-family:sans-serif;margin:20px;max-width:1500px} table{border-collapse:collapse;font-size:12px}"
           "td,th{border:1px solid #ccc;padding:2px 6px} tr.differs td{background:#fff4d6}"
           "img{max-width:100%;display:block;margin:6px 0} .shared{font-size:11px;color:#555} .scroll{overflow-x:auto}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{css}</style></head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{notes}</p>",
             "<h2>Results</h2>", "<div class='scroll'>", _html_table(rows), "</div>", "<h2>Config differences</h2>", _config_html(specs)]
    for section, items in figs.items():
        parts.append(f"<h2>{html.escape(section)}</h2>")
        for cap, b64 in items.items():
            parts.append(f"<figure><figcaption>{html.escape(cap)}</figcaption>"
                         f"<img alt='{html.escape(cap)}' src='data:image/png;base64,{b64}'></figure>")
    parts += [_SCRIPT, "</body></html>"]
    return "\n".join(parts)


def write_report(cfg: Any, specs: list, out: Path) -> dict[str, Path]:
    """``results.csv``, ``results.md`` and ``report.html`` in ``out``."""
    teacher = teacher_reference(cfg, specs)
    rows = collect(cfg, specs, out, teacher)
    write_csv(rows, out / "results.csv")
    b = cfg.budget
    budget = f"{b.kind}: {getattr(b, b.kind)}"
    notes = (f"world <b>{html.escape(str(cfg.world.get('name')))}</b>; training rewards "
             f"{html.escape(', '.join(n for n, *_ in specs[0].resolved.rewards))}; judges "
             f"{html.escape(', '.join(n for n, *_ in specs[0].resolved.judges) or '(none)')}; β = {cfg.beta}; "
             f"budget {html.escape(budget)}; seeds {cfg.seeds}; every score on {cfg.eval.samples} samples from the "
             f"same pinned noise (seed {cfg.eval.seed}); gains are paired differences to the teacher ± se.")
    md = (f"# compare: {cfg.world.get('name')}\n\n{notes.replace('<b>', '**').replace('</b>', '**')}\n\n"
          + markdown_table(rows) + "\n")
    (out / "results.md").write_text(md)
    figs = {"Curves": curve_plots(specs, out), "Frontiers": frontier_plots(rows),
            "Samples (same noise for every method)": sample_grids(cfg, specs, out, teacher),
            "Cost": cost_plot(rows)}
    (out / "report.html").write_text(render_html(f"fewstep-rl compare — {cfg.world.get('name')}", rows, specs, figs,
                                                 notes))
    return {"results_csv": out / "results.csv", "results_md": out / "results.md", "report": out / "report.html"}
