"""NeMo-Run recipes: one factory per paper setting, returning a configured `run.Partial` of the trainer.

    import nemo_run as run
    from megatron_opcd import recipes

    recipe = recipes.opcd_qwen3_8b_math(nodes=2, gpus_per_node=8, data_root="/lustre/opcd-data",
                                        ckpt_root="/lustre/opcd-ckpt", runs_root="/lustre/opcd-runs")
    executor = recipes.slurm_executor(account="my-account", partition="batch", nodes=2, gpus_per_node=8,
                                      container_image="nvcr.io#nvidia/nemo:25.09")
    run.run(recipe, executor=executor, name="opcd-qwen3-8b-math")

    # the tiny CPU run, end to end on this machine:
    run.run(recipes.tiny_cpu_tp2(train_jsonl=..., tokenizer=...), executor=recipes.local_executor(ntasks_per_node=2))

As in NeMo 2 / Megatron-Bridge recipes, the factory holds the whole configuration (the example YAML
of the setting, read when the recipe is built) and the caller changes it with `overrides` or by
editing `recipe.config` / `recipe.overrides` before running. nemo_run is imported only when a
factory or an executor helper is called: the rest of the package works without the `nemo` extra.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_opcd.recipes.executors import local_executor, slurm_executor
from megatron_opcd.recipes.settings import SETTINGS, TINY, Setting


def build_recipe(setting: Setting, *, nodes: int, gpus_per_node: int, data_root: str = "data",
                 ckpt_root: str = "ckpt", runs_root: str = "runs", run_name: Optional[str] = None,
                 overrides: Sequence[str] = ()):
    """`run.Partial(train_from_dict, config=..., overrides=..., expected_world_size=...)` for `setting`,
    checked now: the YAML loads, the layout divides nodes x gpus_per_node, the batch divides over DP."""
    import nemo_run as run
    import yaml

    from megatron_opcd.recipes.entry import train_from_dict
    from megatron_opcd.recipes.validate import check_recipe

    config = yaml.safe_load(setting.yaml_path.read_text(encoding="utf-8"))
    roots = {"data": data_root, "ckpt": ckpt_root, "runs": runs_root}
    paths = [p.format(**roots) for p in setting.paths]
    if setting.paths:
        paths.append(f"checkpoint.save={runs_root}/{run_name or setting.example}")
    all_overrides = [*paths, *overrides]
    check_recipe(config, all_overrides, world_size=nodes * gpus_per_node, name=setting.example)
    return run.Partial(train_from_dict, config=config, overrides=all_overrides,
                       expected_world_size=nodes * gpus_per_node)


def _factory(name: str):
    setting = SETTINGS[name]

    def factory(nodes: int = setting.nodes, gpus_per_node: int = setting.gpus_per_node, **kwargs):
        return build_recipe(setting, nodes=nodes, gpus_per_node=gpus_per_node, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"NeMo-Run recipe: examples/{setting.example}.yaml on {setting.nodes} node(s) x "
                       f"{setting.gpus_per_node} GPUs. kwargs: data_root, ckpt_root, runs_root, run_name, overrides.")
    return factory


opcd_qwen3_8b_math = _factory("opcd_qwen3_8b_math")
opcd_qwen3_1_7b_math_teacher_qwen3_8b = _factory("opcd_qwen3_1_7b_math_teacher_qwen3_8b")
opcd_qwen3_4b_math_teacher_qwen3_8b = _factory("opcd_qwen3_4b_math_teacher_qwen3_8b")
opcd_llama3_1_8b_medical = _factory("opcd_llama3_1_8b_medical")
opcd_llama3_1_8b_safety = _factory("opcd_llama3_1_8b_safety")
opcd_llama3_2_3b_medical = _factory("opcd_llama3_2_3b_medical")
opcd_llama3_2_3b_safety = _factory("opcd_llama3_2_3b_safety")
opcd_qwen2_5_7b_medical = _factory("opcd_qwen2_5_7b_medical")
opcd_qwen2_5_7b_safety = _factory("opcd_qwen2_5_7b_safety")
opcd_qwen2_5_3b_medical = _factory("opcd_qwen2_5_3b_medical")
opcd_qwen2_5_3b_safety = _factory("opcd_qwen2_5_3b_safety")
opcd_qwen3_1_7b_frozenlake = _factory("opcd_qwen3_1_7b_frozenlake")
opcd_qwen3_4b_instruct_sokoban = _factory("opcd_qwen3_4b_instruct_sokoban")


def tiny_cpu_tp2(train_jsonl: str, tokenizer: str, *, save: Optional[str] = None, nodes: int = 1,
                 gpus_per_node: int = 2, overrides: Sequence[str] = ()):
    """NeMo-Run recipe of examples/tiny_cpu_tp2.yaml: 2 CPU ranks (gloo), a random 2-layer model."""
    paths = [f"data.train={train_jsonl}", f"data.tokenizer={tokenizer}"]
    if save:
        paths.append(f"checkpoint.save={save}")
    return build_recipe(TINY, nodes=nodes, gpus_per_node=gpus_per_node, overrides=[*paths, *overrides])


RECIPES = {name: globals()[name] for name in SETTINGS}
"""Every paper setting's factory by name (the tiny CPU recipe, which needs data paths, is apart)."""

__all__ = ["RECIPES", "build_recipe", "local_executor", "slurm_executor", "tiny_cpu_tp2", *SETTINGS]
