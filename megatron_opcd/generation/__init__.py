"""The one KV-cache generation loop, shared by student rollouts, teacher data and evaluation.

    generate(model, prompts, SamplingParams(...), groups=..., vocab_size=...) -> GenerationOutput
    score(model, prompts, responses, groups=..., prefix=...)                -> ScoreOutput
    prefill_prefix(model, prefix, groups=...)                               -> PrefixCache

Both run this rank's pipeline stage of a megatron-core GPTModel under TP and PP, with
megatron-core's `StaticInferenceContext` as the KV cache. See docs/generation.md.
"""

from megatron_opcd.generation.loop import GenerationOutput, generate
from megatron_opcd.generation.sampling import SamplingParams, filter_top_k, filter_top_p, sample
from megatron_opcd.generation.score import ScoreOutput, score
from megatron_opcd.generation.stage import PrefixCache, prefill_prefix

__all__ = [
    "GenerationOutput",
    "PrefixCache",
    "SamplingParams",
    "ScoreOutput",
    "filter_top_k",
    "filter_top_p",
    "generate",
    "prefill_prefix",
    "sample",
    "score",
]
