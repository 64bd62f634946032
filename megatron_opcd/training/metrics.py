"""Where metrics go (rank 0 only): a JSONL file, TensorBoard, Weights & Biases, the console.

    LOG_DIR/metrics.jsonl        one line per training step and per evaluation ("split": train|eval)
    LOG_DIR/eval_samples.jsonl   every evaluation's prompts, responses and grades ("step" says which)
    LOG_DIR/tensorboard/         TensorBoard events (logging.tensorboard)

The console: a progress bar with the step's loss/KL when it is on, one line per step when it is
off; every evaluation is one line either way (written above the bar). `tools/plot_metrics.py`
draws metrics.jsonl as a PNG.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, log_dir: str | Path, *, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "megatron-opcd", wandb_name: Optional[str] = None, config: Optional[dict] = None,
                 progress_total: Optional[int] = None, progress: bool = True, initial: int = 0):
        self.enabled = enabled
        self.dir = Path(log_dir)
        self._tb = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except Exception as exc:  # noqa: BLE001 - tensorboard is optional
                warnings.warn(f"TensorBoard logging is off: {type(exc).__name__}: {exc} (pip install tensorboard)",
                              stacklevel=2)
        if wandb:
            try:
                import wandb as wb

                self._wandb = wb.init(project=wandb_project, name=wandb_name, config=config or {})
            except Exception as exc:  # noqa: BLE001 - wandb is optional
                warnings.warn(f"Weights & Biases logging is off: {type(exc).__name__}: {exc}", stacklevel=2)
        if progress and progress_total:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=progress_total, initial=initial, desc="opcd", unit="step",
                                 file=sys.stderr, dynamic_ncols=True)
            except Exception:  # noqa: BLE001
                self._bar = None

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), "split": prefix,
                  **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in numeric.items()}, step=step)
        if self._bar is not None and prefix == "train":
            self._bar.update(1)
            shown = {k: f"{numeric[k]:.4g}" for k in ("loss", "kl", "response_len", "tokens_per_s") if k in numeric}
            self._bar.set_postfix(shown)
        else:
            line = f"[{prefix} step {step}] " + " ".join(f"{k}={v:.4g}" for k, v in numeric.items())
            if self._bar is not None:
                self._bar.write(line, file=sys.stderr)  # above the bar, which stays at the bottom
            else:
                print(line, flush=True)

    def samples(self, rows: list[dict], name: str = "eval_samples.jsonl") -> None:
        """Append an evaluation's samples (one JSON object per line) to LOG_DIR/`name`."""
        if not self.enabled or not rows:
            return
        with open(self.dir / name, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()
