"""Rank functions for trainer tests (module level: pickled by reference into each rank)."""

from __future__ import annotations


def one_step(config_path: str, overrides: list[str]) -> dict:
    """Build the trainer at the config's layout, run one step, return the loss and full weights."""
    from _layouts import _full_weights
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    trainer = Trainer(cfg, groups)
    batch = trainer.select_batch(1)
    rollout = trainer.rollout(batch, 1)
    teacher = trainer.score_teacher(rollout)
    result = trainer.update(rollout, teacher)
    weights = _full_weights(trainer.student, groups)
    out = {"loss": result.metrics["loss"], "responses": rollout.responses, "weights": weights,
           "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "last": groups.is_last_stage,
           "tied": trainer.model_config.tie_embeddings, "grads": {}}
    trainer.logger.close()
    parallel.destroy()
    return out


def train_run(config_path: str, overrides: list[str]) -> dict:
    """A whole `Trainer.train()`; returns its summary (history of metrics)."""
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    try:
        return Trainer(cfg, groups).train()
    finally:
        parallel.destroy()
