"""The paper's settings as data: which example YAML, how many nodes, and where the paths go.

Each setting names an `examples/*.yaml` (topology in its file name) and the path overrides the
sbatch script passes, as templates over three roots: `{data}`, `{ckpt}` (converted checkpoints)
and `{runs}`. No nemo_run here: tests and tools read this table without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_opcd.config import cluster_topology

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass(frozen=True)
class Setting:
    example: str
    """File stem under examples/ (e.g. opcd_qwen3-8b_math_2n8g_tp2pp1)."""
    paths: tuple[str, ...] = field(default_factory=tuple)
    """key=template overrides; templates use {data}, {ckpt}, {runs}."""

    @property
    def nodes(self) -> int:
        return cluster_topology(self.example)[0]

    @property
    def gpus_per_node(self) -> int:
        return cluster_topology(self.example)[1]

    @property
    def yaml_path(self) -> Path:
        return EXAMPLES / f"{self.example}.yaml"


def _math(student: str, teacher: str) -> tuple[str, ...]:
    return (f"checkpoint.pretrained={{ckpt}}/{student}", f"teacher.checkpoint={{ckpt}}/{teacher}",
            "data.train={data}/dapo-math-17k/train.jsonl", "data.eval={data}/dapo-math-17k/eval.jsonl",
            "context.pool={data}/dapo-math-17k/experience.json")


def _system_prompt(model: str, task: str) -> tuple[str, ...]:
    folder = {"medical": "medmcqa", "safety": "safety"}[task]
    return (f"checkpoint.pretrained={{ckpt}}/{model}", f"teacher.checkpoint={{ckpt}}/{model}",
            f"data.train={{data}}/{folder}/train.jsonl", f"data.eval={{data}}/{folder}/eval.jsonl",
            f"context.file={{data}}/prompts/{task}_system_prompt.txt")


def _game(model: str, game: str) -> tuple[str, ...]:
    # data.train/eval are level files (python -m megatron_opcd.envs --game ... --out FILE).
    return (f"checkpoint.pretrained={{ckpt}}/{model}", f"data.train={{data}}/{game}/train.jsonl",
            f"data.eval={{data}}/{game}/eval.jsonl", f"context.pool={{data}}/{game}/experience.json")


SETTINGS: dict[str, Setting] = {
    "opcd_qwen3_8b_math": Setting("opcd_qwen3-8b_math_2n8g_tp2pp1", _math("qwen3-8b", "qwen3-8b")),
    "opcd_qwen3_1_7b_math_teacher_qwen3_8b": Setting("opcd_qwen3-1.7b_math_teacher-qwen3-8b-tp2_1n8g_tp1pp1",
                                                     _math("qwen3-1.7b", "qwen3-8b")),
    "opcd_qwen3_4b_math_teacher_qwen3_8b": Setting("opcd_qwen3-4b_math_teacher-qwen3-8b-tp2_1n8g_tp1pp1",
                                                   _math("qwen3-4b", "qwen3-8b")),
    "opcd_llama3_1_8b_medical": Setting("opcd_llama3.1-8b_medical_1n8g_tp2pp1", _system_prompt("llama3.1-8b", "medical")),
    "opcd_llama3_1_8b_safety": Setting("opcd_llama3.1-8b_safety_1n8g_tp2pp1", _system_prompt("llama3.1-8b", "safety")),
    "opcd_llama3_2_3b_medical": Setting("opcd_llama3.2-3b_medical_1n8g_tp1pp1", _system_prompt("llama3.2-3b", "medical")),
    "opcd_llama3_2_3b_safety": Setting("opcd_llama3.2-3b_safety_1n8g_tp1pp1", _system_prompt("llama3.2-3b", "safety")),
    "opcd_qwen2_5_7b_medical": Setting("opcd_qwen2.5-7b_medical_1n8g_tp2pp1", _system_prompt("qwen2.5-7b", "medical")),
    "opcd_qwen2_5_7b_safety": Setting("opcd_qwen2.5-7b_safety_1n8g_tp2pp1", _system_prompt("qwen2.5-7b", "safety")),
    "opcd_qwen2_5_3b_medical": Setting("opcd_qwen2.5-3b_medical_1n8g_tp1pp1", _system_prompt("qwen2.5-3b", "medical")),
    "opcd_qwen2_5_3b_safety": Setting("opcd_qwen2.5-3b_safety_1n8g_tp1pp1", _system_prompt("qwen2.5-3b", "safety")),
    # Text games (megatron_opcd/envs, training/games.py GameSource): multi-turn episodes.
    "opcd_qwen3_1_7b_frozenlake": Setting("opcd_qwen3-1.7b_frozenlake_1n8g_tp1pp1", _game("qwen3-1.7b", "frozenlake")),
    "opcd_qwen3_4b_instruct_sokoban": Setting("opcd_qwen3-4b-instruct_sokoban_1n8g_tp1pp1",
                                              _game("qwen3-4b-instruct", "sokoban")),
}

# The tiny CPU run: a random model, no checkpoint; data and tokenizer are passed by the caller.
TINY = Setting("tiny_cpu_tp2", ())
