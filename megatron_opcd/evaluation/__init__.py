"""Tasks and graders, evaluated with and without the context through the shared generation loop.

    task = get_task("math")                                   (names: see TASKS)
    task.grade(response_text, example) -> float in [0, 1]
    evaluate_task(model, tokenizer, renderer, examples, task, groups=..., sampling=..., vocab_size=...,
                  contexts=None)                              -> {"accuracy", "n", "samples", ...}

Experience extraction (the paper's procedure behind tools/extract_experience.py) lives in
`evaluation.experience`; the toy task that CI trains OPCD on in `evaluation.synthetic`.
See docs/evaluation.md.
"""

from megatron_opcd.evaluation.answers import (
    extract_choice,
    extract_label,
    extract_math_answer,
    math_equal,
    normalize_math,
)
from megatron_opcd.evaluation.language import detect_language
from megatron_opcd.evaluation.runner import evaluate_task, generate_texts
from megatron_opcd.evaluation.tasks import (
    TASKS,
    ChoiceTask,
    ExactMatchTask,
    LanguageTask,
    MathTask,
    SafetyTask,
    StartsWithTask,
    Task,
    get_task,
)

__all__ = [
    "TASKS",
    "ChoiceTask",
    "ExactMatchTask",
    "LanguageTask",
    "MathTask",
    "SafetyTask",
    "StartsWithTask",
    "Task",
    "detect_language",
    "evaluate_task",
    "extract_choice",
    "extract_label",
    "extract_math_answer",
    "generate_texts",
    "get_task",
    "math_equal",
    "normalize_math",
]
