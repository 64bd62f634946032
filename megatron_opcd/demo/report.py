"""The demo's outputs: the console table, results.json and the learning-curve PNG.

Pure functions of the results dict, so the test suite checks them without running the demo.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional

REQUIRED_KEYS = ("base", "in_context", "offpolicy_cd", "opcd", "ood_base", "ood_opcd", "ood_offpolicy_cd",
                 "steps", "seconds")
ACCURACY_KEYS = ("base", "in_context", "offpolicy_cd", "opcd", "ood_base", "ood_opcd", "ood_offpolicy_cd")


def _pct(x) -> str:
    return "   -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:3.0f}%"


def _cell(results: dict, key: str) -> str:
    """The mean over the seeds, and the min-max beside it where the seeds differ."""
    value = results.get(key)
    if value is None:
        return _pct(None)
    lo, hi = results.get("spread", {}).get(key, (value, value))
    if round(100 * lo) == round(100 * hi):
        return _pct(value)
    return f"{_pct(value)} ({100 * lo:.0f}-{100 * hi:.0f})"


def gap_closed(results: dict, method: str) -> Optional[float]:
    """(method - base) / (in_context - base): the share of the context's effect the student keeps
    without the context (1 = all of it). None when the context has no effect."""
    gap = results["in_context"] - results["base"]
    if gap <= 0:
        return None
    return (results[method] - results["base"]) / gap


def format_table(results: dict) -> str:
    """The console (and README) table: a markdown table, readable as plain text too. Each cell is
    the mean over the seeds with the min-max over the seeds in brackets (where they differ)."""
    n = results.get("n_eval", "?")
    seeds = len(results.get("per_seed") or [None])
    rows = [
        ("base student (no context)", "base", "ood_base", "", "-"),
        ("teacher: same model + rule in context", "in_context", None, "", "-"),
        ("off-policy CD (forward KL, teacher samples)", "offpolicy_cd", "ood_offpolicy_cd",
         gap_closed(results, "offpolicy_cd"), results["steps"]),
        ("OPCD (reverse KL, student samples, top-256)", "opcd", "ood_opcd", gap_closed(results, "opcd"),
         results["steps"]),
    ]
    lines = [
        f"| run ({seeds} seed{'s' if seeds != 1 else ''}: mean (min-max)) | pirate rule, no context (n={n}) "
        f"| French rule in context (n={n}) | gap closed | steps |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, acc, ood, closed, steps in rows:
        closed_s = "" if closed == "" else ("-" if closed is None else f"{100 * closed:.0f}%")
        lines.append(f"| {name} | {_cell(results, acc)} | {_cell(results, ood) if ood else _pct(None)} "
                     f"| {closed_s} | {steps} |")
    return "\n".join(lines)


def check_results(results: dict) -> None:
    """Raise ValueError when a key is missing or an accuracy is outside [0, 1], in the means or in
    any of `per_seed`'s entries (which must then have the same keys), or when a mean is not the
    mean of the seeds'."""
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise ValueError(f"results lack {', '.join(missing)}")
    rows = [("results", results)] + [(f"per_seed[{i}]", r) for i, r in enumerate(results.get("per_seed", []))]
    for where, row in rows:
        lacking = [k for k in REQUIRED_KEYS if k != "steps" and k not in row]
        if lacking:
            raise ValueError(f"{where} lacks {', '.join(lacking)}")
        for k in ACCURACY_KEYS:
            v = row[k]
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{where}[{k!r}] = {v!r} is not an accuracy in [0, 1]")
    if results.get("per_seed"):
        for k in ACCURACY_KEYS:
            mean = sum(r[k] for r in results["per_seed"]) / len(results["per_seed"])
            if abs(mean - results[k]) > 1e-9:
                raise ValueError(f"results[{k!r}] = {results[k]!r} is not the mean over per_seed ({mean!r})")


def write_results(results: dict, out_dir: str | Path) -> Path:
    """results.json in out_dir, written atomically (a temporary file renamed)."""
    check_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = out / f".results.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def band(curves: list[dict], key: str) -> tuple[list, list, list, list]:
    """(steps, mean, min, max) of `key` over the seeds' curves, at the steps they all have
    (NaN values, not measured, are left out of a step's statistics)."""
    steps = [s for s in curves[0]["step"] if all(s in c["step"] for c in curves)] if curves else []
    mean, lo, hi = [], [], []
    for s in steps:
        vals = [c[key][c["step"].index(s)] for c in curves]
        vals = [v for v in vals if v == v]
        mean.append(sum(vals) / len(vals) if vals else float("nan"))
        lo.append(min(vals) if vals else float("nan"))
        hi.append(max(vals) if vals else float("nan"))
    return steps, mean, lo, hi


def plot_curves(results: dict, path: str | Path) -> Optional[Path]:
    """Three panels over the steps, each method's mean over the seeds as a line and the seeds'
    min-max as a band: the pirate rule without the context (with the teacher's level), the
    French rule in context (what is kept; with the base model's level), and the exact held-out
    KL(student || teacher with the context) on the curve's prompts. Returns None (with a
    warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a CPU box / CI
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no learning-curve plot (pip install matplotlib)", stacklevel=2)
        return None
    styles = {"opcd": ("OPCD", "tab:blue"), "offpolicy_cd": ("off-policy CD", "tab:orange")}
    seeds = len(results.get("per_seed") or [None])
    fig, (ax_acc, ax_ood, ax_kl) = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = ((ax_acc, "accuracy", 100.0), (ax_ood, "ood_accuracy", 100.0), (ax_kl, "heldout_kl", 1.0))
    for method, (label, color) in styles.items():
        curves = results.get("curves", {}).get(method)
        if not curves:
            continue
        for ax, key, scale in panels:
            steps, mean, lo, hi = band(curves, key)
            ax.plot(steps, [scale * v for v in mean], "o-", color=color, label=f"{label} (mean of {seeds})")
            if len(curves) > 1:
                ax.fill_between(steps, [scale * v for v in lo], [scale * v for v in hi], color=color, alpha=0.2,
                                label=f"{label}: min-max over seeds")
    ax_acc.axhline(100 * results["in_context"], color="gray", ls="-.", lw=1, label="teacher: rule in context")
    ax_acc.set(xlabel="step", ylabel="% of held-out replies", ylim=(-3, 103),
               title="learned: pirate rule, no context")
    ax_ood.axhline(100 * results["ood_base"], color="gray", ls=":", lw=1, label="base model")
    ax_ood.set(xlabel="step", ylabel="% of held-out replies", ylim=(-3, 103),
               title="kept: French rule in context")
    ax_kl.set(xlabel="step", ylabel="KL per token (nats)", title="held-out KL(student || teacher with context)")
    ax_kl.set_yscale("log")
    for ax in (ax_acc, ax_ood, ax_kl):
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
