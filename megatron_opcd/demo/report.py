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


def gap_closed(results: dict, method: str) -> Optional[float]:
    """(method - base) / (in_context - base): the share of the context's effect the student keeps
    without the context (1 = all of it). None when the context has no effect."""
    gap = results["in_context"] - results["base"]
    if gap <= 0:
        return None
    return (results[method] - results["base"]) / gap


def format_table(results: dict) -> str:
    """The console (and README) table: a markdown table, readable as plain text too."""
    n = results.get("n_eval", "?")
    rows = [
        ("base student (no context)", results["base"], results["ood_base"], "", "-"),
        ("teacher: same model + rule in context", results["in_context"], None, "", "-"),
        ("off-policy CD (forward KL, teacher samples)", results["offpolicy_cd"], results["ood_offpolicy_cd"],
         gap_closed(results, "offpolicy_cd"), results["steps"]),
        ("OPCD (reverse KL, student samples, top-256)", results["opcd"], results["ood_opcd"],
         gap_closed(results, "opcd"), results["steps"]),
    ]
    lines = [
        f"| run | pirate rule, no context (n={n}) | French rule in context (n={n}) | gap closed | steps |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, acc, ood, closed, steps in rows:
        closed_s = "" if closed == "" else ("-" if closed is None else f"{100 * closed:.0f}%")
        lines.append(f"| {name} | {_pct(acc)} | {_pct(ood)} | {closed_s} | {steps} |")
    return "\n".join(lines)


def check_results(results: dict) -> None:
    """Raise ValueError when a key is missing or an accuracy is outside [0, 1]."""
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise ValueError(f"results lack {', '.join(missing)}")
    for k in ACCURACY_KEYS:
        v = results[k]
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"results[{k!r}] = {v!r} is not an accuracy in [0, 1]")


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


def plot_curves(results: dict, path: str | Path) -> Optional[Path]:
    """Accuracy without the context and training KL vs step for both methods; the in-context
    (teacher) level as a line. Returns None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a CPU box / CI
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no learning-curve plot (pip install matplotlib)", stacklevel=2)
        return None
    styles = {"opcd": ("OPCD", "tab:blue"), "offpolicy_cd": ("off-policy CD", "tab:orange")}
    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, (label, color) in styles.items():
        curve = results.get(f"curve_{method}")
        if not curve:
            continue
        ax_acc.plot(curve["step"], [100 * a for a in curve["accuracy"]], "o-", color=color,
                    label=f"{label}: pirate rule, no context")
        ood = [a for a in curve.get("ood_accuracy", []) if a == a]  # NaN: not measured
        if ood:
            ax_acc.plot(curve["step"], [100 * a for a in curve["ood_accuracy"]], "s--", color=color, alpha=0.7,
                        label=f"{label}: French rule in context")
        ax_kl.plot(curve["kl_step"], curve["kl"], "-", color=color,
                   label=f"{label} ({'reverse' if method == 'opcd' else 'forward'} KL, top-256)")
    ax_acc.axhline(100 * results["in_context"], color="gray", ls="-.", lw=1, label="teacher: pirate rule in context")
    ax_acc.axhline(100 * results["ood_base"], color="gray", ls=":", lw=1, label="base: French rule in context")
    ax_acc.set(xlabel="step", ylabel="% of held-out replies", ylim=(-3, 103),
               title="student: learned rule vs. in-context rule kept")
    ax_acc.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax_kl.set(xlabel="step", ylabel="training divergence per token", title="KL being minimised")
    ax_kl.set_yscale("log")
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": keep the legend below the axes
    plt.close(fig)
    return path
