"""Sampling: the parameters, and pure functions from full-vocabulary logits to (token, log-prob).

Everything here is math on one rank's tensors; the loop (loop.py) gathers the vocab-parallel
logits over TP first, so every rank of the model sees the same `[b, V]` row and, with the same
seeded generator, picks the same token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How `generate` picks each new token and when it stops: the one declaration of the sampling
    settings and their defaults. The trainer's `generation:` section builds one per rollout
    (`training.config.GenerationConfig.build`, which adds the tokenizer's EOS ids and the seed)."""

    max_new_tokens: int = 256
    """Most tokens generated per prompt (the EOS token counts)."""

    temperature: float = 1.0
    """Divides the logits before top-k/top-p and sampling; must be > 0 unless `greedy`."""

    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns the filter off."""

    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (nucleus); 1.0 turns it off."""

    greedy: bool = False
    """Take the argmax (temperature, top-k and top-p are ignored; log-probs are at temperature 1)."""

    eos_ids: tuple[int, ...] = ()
    """Token ids that end a response (the EOS token is kept in the response)."""

    stop_strings: tuple[str, ...] = ()
    """Strings that end a response once the decoded response contains one (needs `decode`)."""

    seed: int = 0
    """Seed of the sampling generator: same seed, same prompts, same weights -> same tokens."""

    compile_decode: str = "auto"
    """The compiled decode step (generation/compiled.py): "auto" (stages of >= 50M parameters,
    where the compile pays), "always" or "never" (the eager step). Same tokens either way."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(
                f"SamplingParams.temperature must be > 0, got {self.temperature}; use greedy=True for argmax decoding"
            )
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.compile_decode not in ("auto", "always", "never"):
            raise ValueError(f"SamplingParams.compile_decode must be auto, always or never, got {self.compile_decode!r}")
        self.eos_ids = tuple(int(t) for t in self.eos_ids)
        self.stop_strings = tuple(self.stop_strings)
        if any(not s for s in self.stop_strings):
            raise ValueError("SamplingParams.stop_strings must not contain an empty string")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set everything below the k-th largest logit of each row to -inf (ties at the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # A token is dropped when the tokens strictly more likely than it already reach p.
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, vocab_size: int,
    rows: torch.Tensor | None = None, batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary logits `[b, V_padded]` -> (tokens `[b]` int64, log-probs `[b]` float32).

    `rows` (`[b]` int64, of a `batch` >= b): the logits are those rows of a larger batch (the rest
    finished and were dropped, generation/loop.py); the random numbers are drawn for the whole
    batch and these rows take theirs, so each row samples what it would in the full batch.

    The log-prob is of the sampled token under the temperature-scaled distribution *before*
    top-k/top-p filtering (temperature 1 for greedy): the policy's own probability, which is what
    an on-policy objective compares against. Computed in fp32.
    """
    # Drop the TP padding columns rather than masking them: the padded width depends on the TP
    # size, so slicing keeps the rows, and a seed's samples, identical at every TP layout.
    logits = logits[..., :vocab_size].float()  # [b, V]
    if params.greedy:
        tokens = torch.argmax(logits, dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / params.temperature
        logprobs = torch.log_softmax(scaled, dim=-1)
        filtered = filter_top_p(filter_top_k(scaled, params.top_k), params.top_p)
        tokens = draw_categorical(torch.softmax(filtered, dim=-1), generator, rows=rows, batch=batch)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def draw_categorical(probs: torch.Tensor, generator: torch.Generator | None, rows: torch.Tensor | None = None,
                     batch: int | None = None) -> torch.Tensor:
    """One token per row of `probs` (`[b, V]`, non-negative, rows need not sum to 1) by inverse
    transform: the first id whose cumulative probability (float64) exceeds u * total, u ~ U[0, 1).

    An exact draw from the categorical distribution, with one random number per row.
    `torch.multinomial` draws the same distribution at an order of magnitude more CPU time, a
    sizeable share of a small model's decode step (docs/generation.md). A token of probability 0
    is never drawn: the cumulative sum does not rise at it, so it is never the first to exceed u."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [b, V]
    total = cdf[:, -1:].contiguous()  # [b, 1]
    if rows is None:
        u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device)
    else:  # this step's numbers of the whole batch, at the rows still decoding (see `sample`)
        u = torch.rand((batch, 1), generator=generator, dtype=torch.float64, device=probs.device)[rows]
    u = u * total
    tokens = torch.searchsorted(cdf, u, right=True)
    # Rounding can put u * total at total itself: take the last id that raises the sum instead.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(tokens, last).squeeze(-1)
