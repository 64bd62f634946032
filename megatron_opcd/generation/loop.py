"""Batched incremental decoding over this rank's stage of a megatron-core GPT model (TP and PP).

Layout of the batch in the KV cache (every row writes the same slot at each step):

    slot:  0 .. P-1       | P .. P+pad_i-1 | .. P+L-1   | P+L .. P+L+N-1
    row i: shared prefix  | pads           | prompt i   | generated tokens
    pos:   0 .. P-1       | (masked)       | P .. P+n_i-1 | P+n_i ..

Pads are masked as keys. Keys are rotated with the token's position (not its slot, see
stage.py), so a row's pads between prefix and prompt change nothing it computes: a cached prefix
(prefilled once at batch 1) sits at slots [0, P) of every row and the prompt prefill covers slots
[P, P+L). An empty prompt's row takes the prefix's last token as its prompt (see `_layout`).

Each step the last stage gathers the full-vocabulary logits of the last position, drops the padded
vocabulary, samples with one seeded generator, and broadcasts (token, log-prob) to every rank of
the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_opcd.compat import mcore
from megatron_opcd.generation.cache import KVCache
from megatron_opcd.generation.compiled import batch_bucket, layers_compiled, span_bucket, timed_first_call, wanted
from megatron_opcd.generation.sampling import SamplingParams, sample
from megatron_opcd.generation.stage import (
    PrefixCache,
    Rope,
    _prefill_prefix,
    broadcast_from_last_stage,
    causal_mask_with_keys,
    forward_stage,
    inference_mode,
    model_device,
)
from megatron_opcd.models.kernels import attach
from megatron_opcd.parallel import ParallelGroups

Prefix = Union[Sequence[int], PrefixCache, None]

COMPACT_FINISHED_ROWS = True
"""Finished rows leave the batch (see `_target_batch`). Tests switch it off to compare with the
loop that decodes every row to the end: the same tokens."""


@dataclass
class GenerationOutput:
    responses: list[list[int]]
    """New tokens per prompt (the EOS token included if hit; nothing after it)."""

    logprobs: list[list[float]]
    """Log-prob of each sampled token at the sampling temperature (greedy: temperature 1)."""

    lengths: list[int]
    """len(responses[i])."""

    finish_reasons: list[str]
    """'eos' | 'stop' | 'length' per prompt."""

    tokens_per_second: float
    """New tokens (all rows) / wall time of the call, prefill included."""

    compile_seconds: float = 0.0
    """Time of this call's first steps of (batch, span) buckets compiled in it (0: none was new)."""


def _check_tokens(seqs: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
    for i, seq in enumerate(seqs):
        for t in seq:
            if not 0 <= int(t) < vocab_size:
                raise ValueError(f"{what}[{i}] holds token id {t}, outside the vocabulary [0, {vocab_size})")


@dataclass
class _Layout:
    """Token, position and validity of every cache slot of every row (see the module docstring)."""

    tokens: torch.Tensor  # [b, T] int64
    positions: torch.Tensor  # [b, T] int64 (0 on pads: any id in range, they are masked)
    valid: torch.Tensor  # [b, T] bool, False for pads
    prefix_len: int
    prompt_len: int  # L: the longest prompt

    @property
    def first_gen_slot(self) -> int:
        return self.prefix_len + self.prompt_len


def _layout(prefix: list[int], prompts: list[list[int]], max_new: int, device) -> _Layout:
    """A row's last real token must sit in the last prompt slot (its logits give the first new
    token). An empty prompt therefore takes the prefix's last token as its prompt, at that token's
    position, and its copy in the cached prefix (slot P-1) is masked for that row."""
    b, p = len(prompts), len(prefix)
    rows = [(prompt, p) if prompt else (prefix[-1:], p - 1) for prompt in prompts]  # (prompt, its first position)
    big = max(len(x) for x, _ in rows)
    total = p + big + max_new
    tokens = torch.zeros(b, total, dtype=torch.long)
    valid = torch.ones(b, total, dtype=torch.bool)
    positions = torch.arange(total).repeat(b, 1)
    tokens[:, :p] = torch.tensor(prefix, dtype=torch.long)
    for i, (prompt, first) in enumerate(rows):
        start = p + big - len(prompt)  # the slot of the prompt's first token
        tokens[i, start : p + big] = torch.tensor(prompt, dtype=torch.long)
        valid[i, p:start] = False
        valid[i, first:p] = False  # the prefix token moved into the prompt (empty prompts only)
        positions[i, start:] -= start - first  # the prompt continues at its position
        positions[i, p:start] = 0
    return _Layout(tokens=tokens.to(device), positions=positions.to(device), valid=valid.to(device),
                   prefix_len=p, prompt_len=big)


def _keep_rows(lay: _Layout, rows: torch.Tensor) -> _Layout:
    return _Layout(tokens=lay.tokens[rows], positions=lay.positions[rows], valid=lay.valid[rows],
                   prefix_len=lay.prefix_len, prompt_len=lay.prompt_len)


class _CachedStepper:
    """Prefill, then one token per step through the KV cache (attached to the module by `generate`).

    `compiled`: the decode steps run the compiled static-shape step (generation/compiled.py); the
    prefill stays eager. A shared prefix is then copied into every row (a shared one would make its
    length part of every traced shape)."""

    def __init__(self, module, lay: _Layout, groups: ParallelGroups, prefix: Optional[PrefixCache], cache: KVCache,
                 compiled: bool = False):
        self.module, self.lay, self.groups, self.cache = module, lay, groups, cache
        self.rope = Rope(module, lay.tokens.shape[1])
        self.compiled, self.compile_seconds = compiled, 0.0
        if prefix is not None:
            # Shared (one copy, cascade attention) unless an empty prompt took the prefix's last
            # token and masks its cached copy (see `_layout`).
            shared = not compiled and not bool((~lay.valid[:, : lay.prefix_len]).any())
            cache.load_prefix(prefix.kv, len(prefix), shared=shared)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.lay = _keep_rows(self.lay, rows)
        self.cache.keep_rows(rows)

    def _run(self, start: int, end: int) -> Optional[torch.Tensor]:
        lay = self.lay
        mask = causal_mask_with_keys(lay.valid, start, end - start)  # [b, 1, s, end]
        assert self.cache.offset == start
        logits = forward_stage(self.module, lay.tokens[:, start:end], lay.positions[:, start:end], mask,
                               groups=self.groups, rope=self.rope, cache=self.cache, last_only=True)
        return None if logits is None else logits[:, -1, :]  # [b, V]

    def prefill(self) -> Optional[torch.Tensor]:
        return self._run(self.cache.offset, self.lay.first_gen_slot)

    def step(self, slot: int) -> Optional[torch.Tensor]:
        """Feed the token at `slot` (already written into the layout); logits for `slot + 1`."""
        if self.compiled:
            try:
                return self._static_step(slot)
            except Exception:  # noqa: BLE001 - said once by compiled.timed_first_call; the step again, eagerly
                self.compiled = False
            finally:
                self.cache.slot = None
        return self._run(slot, slot + 1)

    def _static_step(self, slot: int) -> Optional[torch.Tensor]:
        """The step with the shapes of its (batch, span) bucket: the causal mask over `span` slots
        (the ones after `slot` are masked, unwritten or not), the write at a slot tensor."""
        lay, cache = self.lay, self.cache
        span = span_bucket(slot + 1, cache.max_seq)
        k_slot = torch.arange(span, device=lay.tokens.device)
        masked = (k_slot > slot)[None] | ~lay.valid[:, :span]  # [b, span]; a generated slot is valid
        cache.slot, cache.span = torch.tensor([slot], device=lay.tokens.device), span
        cfg = self.module.config
        key = (lay.tokens.shape[0], span, cache.max_seq, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
               cfg.num_query_groups, self.groups.tp_size, str(cfg.params_dtype))
        cores = list(mcore.attention_cores(self.module))

        def run():
            try:
                for number, core in cores:
                    core.kv_static = cache.layers[number]
                with layers_compiled(self.module):
                    return forward_stage(self.module, lay.tokens[:, slot:slot + 1], lay.positions[:, slot:slot + 1],
                                         masked[:, None, None, :], groups=self.groups, rope=self.rope, cache=cache,
                                         last_only=True)
            finally:
                for _, core in cores:
                    core.kv_static = None

        logits, seconds = timed_first_call(key, run)
        self.compile_seconds += seconds
        return None if logits is None else logits[:, -1, :]  # [b, V]


class _RecomputeStepper:
    """The same loop without a cache: every step runs the whole sequence so far through megatron's
    own core attention (the reference the cache is measured and tested against)."""

    def __init__(self, module, lay: _Layout, groups: ParallelGroups):
        self.module, self.lay, self.groups = module, lay, groups
        self.rope = Rope(module, lay.tokens.shape[1])

    def _run(self, end: int) -> Optional[torch.Tensor]:
        lay = self.lay
        mask = causal_mask_with_keys(lay.valid, 0, end)
        logits = forward_stage(self.module, lay.tokens[:, :end], lay.positions[:, :end], mask, groups=self.groups,
                               rope=self.rope, last_only=True)
        return None if logits is None else logits[:, -1, :]

    compiled, compile_seconds = False, 0.0

    def prefill(self) -> Optional[torch.Tensor]:
        return self._run(self.lay.first_gen_slot)

    def step(self, slot: int) -> Optional[torch.Tensor]:
        return self._run(slot + 1)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.lay = _keep_rows(self.lay, rows)


def generate(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    groups: ParallelGroups,
    vocab_size: int,
    prefix: Prefix = None,
    decode: Optional[Callable[[list[int]], str]] = None,
    progress: bool = False,
    use_cache: bool = True,
    between_steps: Optional[Callable[[int], None]] = None,
) -> GenerationOutput:
    """Sample a response for every prompt (token ids) with this rank's stage of the model.

    Call on every rank of the model's TP x PP group with the same arguments; every rank returns
    the same tokens and log-probs. `prefix` (token ids, or a `PrefixCache` from `prefill_prefix`)
    is prefilled once at batch 1 and shared by all rows; the prompts continue after it.
    `decode(token_ids) -> str` is needed for `params.stop_strings`. `use_cache=False` recomputes
    the whole sequence every step (for tests and benchmarks). The model comes back in the
    train/eval mode it had.

    `between_steps(decode_step)` is called on every rank after each decode step that is not the
    last (the trainer's preemption check, training/preempt.py); an exception it raises ends the
    call (the KV cache is dropped, the model's mode restored). Every rank of the model's group
    makes the same calls: they decode in lockstep.
    """
    start_time = time.perf_counter()
    prompts = [list(map(int, p)) for p in prompts]
    lockstep = expert_lockstep_group(model, groups)
    if not prompts:
        if lockstep is None:
            return GenerationOutput([], [], [], [], 0.0)
        # The MoE layers' all-to-alls need every rank of the expert group: decode one throw-away
        # row (a one-token prompt) for as many steps as the others, and return nothing.
        generate(model, [[0]], params, groups=groups, vocab_size=vocab_size, prefix=prefix, use_cache=use_cache,
                 between_steps=between_steps)
        return GenerationOutput([], [], [], [], 0.0)
    if params.stop_strings and decode is None:
        raise ValueError("SamplingParams.stop_strings needs a `decode` callable (token ids -> text)")
    prefix_cache = prefix if isinstance(prefix, PrefixCache) else None
    prefix_ids = list(prefix_cache.tokens if prefix_cache is not None else (prefix or []))
    _check_tokens(prompts, vocab_size, "prompts")
    _check_tokens([prefix_ids], vocab_size, "prefix")
    if not prefix_ids:
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty and there is no prefix: nothing to continue from")
    with inference_mode(model) as module:
        limit = getattr(module, "max_sequence_length", None)
        total = len(prefix_ids) + max(len(p) for p in prompts) + params.max_new_tokens
        if limit is not None and total > limit:
            raise ValueError(
                f"prefix + longest prompt + max_new_tokens = {total} tokens exceeds the model's "
                f"max_position_embeddings={limit}; shorten the inputs or lower max_new_tokens"
            )
        lay = _layout(prefix_ids, prompts, params.max_new_tokens, model_device(module))
        if not use_cache:
            stepper = _RecomputeStepper(module, lay, groups)
            return _decode_loop(stepper, lay, params, groups, vocab_size, decode, progress, start_time,
                                between_steps, lockstep)
        if prefix_ids and prefix_cache is None:
            prefix_cache = _prefill_prefix(module, prefix_ids, groups)
        static = wanted(params.compile_decode, module)
        if static:  # the cache's length a bucket too: calls of nearby lengths share their traced steps
            lay = _pad_slots(lay, span_bucket(lay.tokens.shape[1], 1 << 62))
        cache = KVCache(len(prompts), lay.tokens.shape[1])
        with attach(module, cache, decode=True):
            stepper = _CachedStepper(module, lay, groups, prefix_cache, cache, compiled=static)
            return _decode_loop(stepper, lay, params, groups, vocab_size, decode, progress, start_time,
                                between_steps, lockstep)


def expert_lockstep_group(model, groups: ParallelGroups):
    """The expert-parallel group when `model` has MoE layers and EP > 1, else None.

    Under EP every MoE layer's forward is an all-to-all over the EP group, whose ranks are data-
    parallel replicas with their own prompts: they must run as many forwards as each other. The
    decode loop then stops when every row of every EP rank is done (finished rows keep decoding,
    their outputs dropped, as within one batch), and a rank without prompts still decodes a
    throw-away row. Few rows per step route few tokens: no capacity, no padding."""
    config = getattr(model, "config", None)
    if getattr(groups, "ep_size", 1) > 1 and getattr(config, "num_moe_experts", None):
        return groups.ep_group
    return None


def _all_done(local: bool, lockstep) -> bool:
    """`local`, or with an expert group, whether every rank of it is done (one small all-reduce)."""
    if lockstep is None:
        return local
    flag = torch.tensor([0.0 if local else 1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=lockstep)
    return flag.item() == 0.0


def _pad_slots(lay: _Layout, total: int) -> _Layout:
    """`lay` with slots up to `total` (valid, token 0, position 0): never read, as every query
    masks the slots after its own, but they make the cache's length a bucket."""
    b, t = lay.tokens.shape
    if total <= t:
        return lay
    pad = total - t
    return _Layout(tokens=torch.cat([lay.tokens, lay.tokens.new_zeros(b, pad)], 1),
                   positions=torch.cat([lay.positions, lay.positions.new_zeros(b, pad)], 1),
                   valid=torch.cat([lay.valid, lay.valid.new_ones(b, pad)], 1),
                   prefix_len=lay.prefix_len, prompt_len=lay.prompt_len)


def stop_in_tail(response: list[int], stops: tuple[str, ...], decode, longest: int) -> bool:
    """Whether a stop string occurs in the text of `response` near its end: the last tokens whose
    text holds at least `longest` + 1 characters, and one token more (a token's text may depend on
    the one before it: a leading space, the rest of a multi-byte character). Checked after every
    new token, this finds the first stop string the whole decoded response would, at a cost that
    does not grow with the response (the text before the tail held none, or the row had stopped)."""
    n = min(len(response), longest + 2)
    while True:
        text = decode(response[-n:])
        if len(text) > longest or n == len(response):
            break
        n = min(len(response), 2 * n)
    if n < len(response):
        text = decode(response[-(n + 1):])
    return any(s in text for s in stops)


def _decode_loop(stepper, lay: _Layout, params: SamplingParams, groups: ParallelGroups, vocab_size: int,
                 decode, progress: bool, start_time: float,
                 between_steps: Optional[Callable[[int], None]] = None, lockstep=None) -> GenerationOutput:
    """Sample until every row is done (with `lockstep`, every row of every rank of that group).
    Rows that finish leave the batch once the rows still decoding fit a smaller one
    (`_target_batch`): the stepper keeps only those rows of its layout and cache, and `rows` maps
    the batch's rows to the prompts."""
    b = lay.tokens.shape[0]
    device = lay.tokens.device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    responses: list[list[int]] = [[] for _ in range(b)]
    logprobs: list[list[float]] = [[] for _ in range(b)]
    reasons: list[Optional[str]] = [None] * b
    rows = torch.arange(b, device=device)  # the prompt of each row of the (compacted) batch
    eos = set(params.eos_ids)
    longest_stop = max((len(s) for s in params.stop_strings), default=0)
    bar = _progress_bar(params.max_new_tokens, progress)
    logits = stepper.prefill()
    for step in range(params.max_new_tokens):
        # [2, b'] float64 carries token ids (exact below 2**53) and log-probs in one broadcast.
        payload = torch.zeros(2, rows.numel(), dtype=torch.float64, device=device)
        if logits is not None:
            tokens, lps = sample(logits, params, generator, vocab_size, rows=rows, batch=b)
            payload[0], payload[1] = tokens.to(torch.float64), lps.to(torch.float64)
        broadcast_from_last_stage(payload, groups)
        tokens = payload[0].long()
        for j, i in enumerate(rows.tolist()):
            if reasons[i] is not None:
                continue
            tok = int(tokens[j])
            responses[i].append(tok)
            logprobs[i].append(float(payload[1, j]))
            if tok in eos:
                reasons[i] = "eos"
            elif params.stop_strings and stop_in_tail(responses[i], params.stop_strings, decode, longest_stop):
                reasons[i] = "stop"
            elif len(responses[i]) >= params.max_new_tokens:
                reasons[i] = "length"
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tok_s=f"{sum(map(len, responses)) / (time.perf_counter() - start_time):.1f}")
        if _all_done(all(r is not None for r in reasons), lockstep):
            break
        if between_steps is not None:
            between_steps(step)  # may raise (a preemption): nothing of this call is kept
        slot = lay.first_gen_slot + step
        stepper.lay.tokens[:, slot] = tokens  # finished rows still in the batch decode; their outputs are dropped
        keep = _target_batch(rows, reasons, stepper.compiled) if COMPACT_FINISHED_ROWS else None
        if keep is not None:  # the same decision on every rank: it reads only broadcast tokens
            stepper.keep_rows(keep)
            rows = rows[keep]
        logits = stepper.step(slot)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start_time
    lengths = [len(r) for r in responses]
    return GenerationOutput(
        responses=responses,
        logprobs=logprobs,
        lengths=lengths,
        finish_reasons=[r or "length" for r in reasons],
        tokens_per_second=sum(lengths) / max(elapsed, 1e-9),
        compile_seconds=stepper.compile_seconds,
    )


def _target_batch(rows: torch.Tensor, reasons: list, buckets: bool) -> Optional[torch.Tensor]:
    """Which rows of the batch to keep (`[b']` int64 into it), or None to keep them all.

    Eager: the rows still decoding, as soon as one has finished (a compaction copies the cache
    once, about what one step's attention reads). Compiled (`buckets`): only when they fit the
    next smaller power of two, padded up to it with finished rows, so the batch takes a few
    shapes (8, 4, 2, 1), each traced once."""
    live = [j for j, i in enumerate(rows.tolist()) if reasons[i] is None]
    # At least one row: under expert lockstep a rank whose rows are all done keeps decoding one
    # (its MoE layers' all-to-alls need it) until every rank of the group is done.
    target = max(1, batch_bucket(len(live)) if buckets else len(live))
    if target >= rows.numel():
        return None
    done = [j for j in range(rows.numel()) if reasons[int(rows[j])] is not None]
    keep = sorted(live + done[: target - len(live)])
    return torch.tensor(keep, dtype=torch.long, device=rows.device)


def _progress_bar(total: int, enabled: bool):
    import torch.distributed as dist

    if not enabled or (dist.is_initialized() and dist.get_rank() != 0):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar, the caller still gets tokens_per_second
        return None
    return tqdm(total=total, desc="generate", unit="step", dynamic_ncols=True)
