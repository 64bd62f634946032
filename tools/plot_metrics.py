#!/usr/bin/env python
"""Draw a training run's metrics.jsonl as a PNG.

    python tools/plot_metrics.py runs/smollm2/opcd                    -> runs/smollm2/opcd/metrics.png
    python tools/plot_metrics.py runs/x/metrics.jsonl --out curves.png [--metrics loss,kl,accuracy]

One panel per metric, against the optimizer step: training steps as a line, evaluations
("split": "eval", e.g. the held-out KL and the task's accuracy) as markers. By default the
panels are the metrics a reader looks at first (loss, kl, grad_norm, response_len and every
evaluation metric) among those the file holds. Needs matplotlib (`pip install -e '.[plot]'`,
installed by `make install`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_TRAIN = ("loss", "kl", "grad_norm", "response_len")


class PlotError(ValueError):
    """A metrics file that cannot be drawn; the message says why."""


def read_metrics(path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{split: {metric: [(step, value), ...]}} of the numeric values of a metrics.jsonl."""
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist; pass a run folder (logging.dir) or its metrics.jsonl")
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path}:{lineno}: malformed JSON") from None
        split, step = row.get("split", "train"), row.get("step")
        if not isinstance(step, int):
            continue
        for k, v in row.items():
            if k in ("step", "time", "split") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                out.setdefault(split, {}).setdefault(k, []).append((step, float(v)))
    if not out:
        raise PlotError(f"{path} holds no metrics")
    return out


def panels(data: dict, wanted: list[str] | None) -> list[tuple[str, str]]:
    """(split, metric) per panel."""
    have = [(s, m) for s in data for m in data[s]]
    if wanted:
        chosen = [(s, m) for s, m in have if m in wanted]
        missing = [m for m in wanted if not any(m == hm for _, hm in have)]
        if missing:
            raise PlotError(f"metrics {', '.join(missing)} are not in the file; it has: "
                            f"{', '.join(sorted({m for _, m in have}))}")
        return chosen
    train = [("train", m) for m in DEFAULT_TRAIN if m in data.get("train", {})]
    evals = [(s, m) for s, m in have if s != "train"]
    return train + evals or have


def plot(metrics_path: str | Path, out: str | Path | None = None, wanted: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(metrics_path)
    data = read_metrics(path)
    chosen = panels(data, wanted)
    out = Path(out) if out else (path if path.is_dir() else path.parent) / "metrics.png"
    cols = min(3, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (split, metric) in zip(axes.flat, chosen):
        points = sorted(data[split][metric])
        steps, values = [p[0] for p in points], [p[1] for p in points]
        style = dict(marker="o") if split != "train" or len(points) < 3 else {}
        ax.plot(steps, values, color="tab:orange" if split != "train" else "tab:blue", **style)
        ax.set_title(f"{split}/{metric}", fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.02)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(str(path if path.is_file() else path / "metrics.jsonl"), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (logging.dir; default checkpoint.save) or its metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default: metrics.png beside metrics.jsonl)")
    p.add_argument("--metrics", help="comma-separated metric names (default: loss, kl, grad_norm, response_len "
                                     "and the evaluation metrics)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 1
    try:
        out = plot(args.run, args.out, [m for m in (args.metrics or "").split(",") if m] or None)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
