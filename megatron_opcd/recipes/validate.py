"""Build-time checks of a recipe: the config loads and fits the job's size (no nemo_run needed)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from megatron_opcd.errors import ConfigError
from megatron_opcd.training.config import load_train_config


def check_recipe(config: dict, overrides: Sequence[str], *, world_size: int, name: str):
    """The TrainConfig the recipe will run; a `ConfigError` naming the recipe if it cannot."""
    with tempfile.TemporaryDirectory(prefix="opcd-recipe-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False), encoding="utf-8")
        try:
            cfg = load_train_config(str(path), list(overrides))
            cfg.parallel.check_world_size(world_size)
            dp = world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)
            cfg.check_batches(dp)
        except ConfigError as exc:
            raise ConfigError(f"recipe {name} with {world_size} processes: {exc}") from None
    return cfg
