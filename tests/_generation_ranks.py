"""Rank functions for tests/test_generation.py (module level: the launcher pickles them by reference).

`suite(tp, pp)` builds the same tiny model (layout-invariant init: same weights at every layout)
and runs one fixed set of generate/score calls; the parent compares layouts with the
single-process run, and the single-process run with `naive_*` below: plain full-sequence forwards
of one unpadded sequence at a time, no cache, no generation code.
"""

from __future__ import annotations

import torch

CFG = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
           vocab_size=250, make_vocab_size_divisible_by=64, max_position_embeddings=128,
           init_method_std=0.2)  # wide init: peaked distributions, greedy far from ties
SEED = 11
PROMPTS = [[5, 7, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11], [200, 100, 50, 25]]
PREFIX = list(range(30, 52))
RESPONSES = [[8, 1, 2, 3], [], [90, 91], [7, 7, 7, 7, 7, 7]]
N = 12


def _model(tp: int, pp: int, sp: bool = False, **model_kwargs):
    from megatron_opcd import parallel
    from megatron_opcd.config import ModelConfig, ParallelConfig
    from megatron_opcd.models import build_model

    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                sequence_parallel=sp))
    cfg = ModelConfig(**{**CFG, **model_kwargs})
    return build_model(cfg, groups=groups, seed=SEED), cfg, groups


def _gather_vocab(t: torch.Tensor, groups) -> torch.Tensor:
    if groups.tp_size == 1:
        return t
    pieces = [torch.empty_like(t) for _ in range(groups.tp_size)]
    torch.distributed.all_gather(pieces, t.contiguous(), group=groups.tp_group)
    return torch.cat(pieces, dim=-1)


def _out(o) -> dict:
    return {"responses": o.responses, "logprobs": o.logprobs, "reasons": o.finish_reasons}


def suite(tp: int, pp: int, sp: bool = False, model_kwargs: dict | None = None) -> dict:
    """The fixed generate/score calls at one layout; per-rank results."""
    from megatron_opcd.generation import SamplingParams, generate, prefill_prefix, score

    model, cfg, groups = _model(tp, pp, sp, **(model_kwargs or {}))
    model.train()  # generate must switch to eval and back
    v = cfg.vocab_size
    greedy = SamplingParams(max_new_tokens=N, greedy=True)
    sampled = SamplingParams(max_new_tokens=N, temperature=0.8, top_k=50, top_p=0.95, seed=5)
    res = {"tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "last": groups.is_last_stage}
    res["greedy"] = _out(generate(model, PROMPTS, greedy, groups=groups, vocab_size=v))
    res["greedy_prefix"] = _out(generate(model, PROMPTS, greedy, groups=groups, vocab_size=v, prefix=PREFIX))
    res["sampled"] = _out(generate(model, PROMPTS, sampled, groups=groups, vocab_size=v))
    cache = prefill_prefix(model, PREFIX, groups=groups)
    res["sampled_prefix"] = _out(generate(model, PROMPTS, sampled, groups=groups, vocab_size=v, prefix=cache))
    res["compiled"] = compiled_checks(model, groups, v, cache)
    res["training_after"] = model.training
    res["sp_after"] = model.config.sequence_parallel
    for name, prefix in (("score", None), ("score_prefix", cache)):
        out = score(model, PROMPTS, RESPONSES, groups=groups, prefix=prefix, return_logprobs=True, vocab_size=v)
        res[name] = {"mask": out.mask}
        if out.logits is not None:
            res[name].update(logits=_gather_vocab(out.logits, groups), shard=out.logits.shape[-1],
                             logprobs=out.logprobs)
    return res


def compiled_checks(model, groups, v: int, cache) -> dict:
    """The compiled decode step (compile_decode="always") beside the eager one (compared by the test):
    greedy, and sampled with a prefix and an EOS that ends rows at different steps (the batch
    compacts: 4 rows -> 2 -> 1, each a bucket of its own); and the eager loop with and without
    compaction. One span bucket (64 slots) covers every call: a compile per batch bucket."""
    import time

    from megatron_opcd.generation import SamplingParams, generate, loop

    greedy = SamplingParams(max_new_tokens=N, greedy=True)
    sampled = SamplingParams(max_new_tokens=N, temperature=0.8, top_k=50, top_p=0.95, seed=5)
    eager_sampled = generate(model, PROMPTS, sampled, groups=groups, vocab_size=v, prefix=cache)
    # EOS ids: tokens sampled at different steps of different rows, so rows finish one by one.
    eos = tuple({eager_sampled.responses[i][i + 1] for i in range(len(PROMPTS))})
    sampled_eos = SamplingParams(max_new_tokens=N, temperature=0.8, top_k=50, top_p=0.95, seed=5, eos_ids=eos)
    res = {"eos_ids": eos}
    start = time.perf_counter()
    for name, params, kw in (("greedy", greedy, {}), ("sampled_eos", sampled_eos, {"prefix": cache})):
        on = SamplingParams(**{**params.__dict__, "compile_decode": "always"})
        out = generate(model, PROMPTS, on, groups=groups, vocab_size=v, **kw)
        res[name] = {**_out(out), "compile_seconds": out.compile_seconds}
        res["eager_" + name] = _out(generate(model, PROMPTS, params, groups=groups, vocab_size=v, **kw))
    res["seconds"] = time.perf_counter() - start
    # The same compiled call again: every bucket is traced already (no compile time).
    on = SamplingParams(**{**sampled_eos.__dict__, "compile_decode": "always"})
    again = generate(model, PROMPTS, on, groups=groups, vocab_size=v, prefix=cache)
    res["again"] = {**_out(again), "compile_seconds": again.compile_seconds}
    loop.COMPACT_FINISHED_ROWS = False
    try:
        res["uncompacted_sampled_eos"] = _out(generate(model, PROMPTS, sampled_eos, groups=groups, vocab_size=v,
                                                       prefix=cache))
    finally:
        loop.COMPACT_FINISHED_ROWS = True
    return res


def many_suites(runs: list[dict]) -> list[dict]:
    """Several layouts in one launch (process start-up is the expensive part on 2 cores)."""
    return [suite(**kw) for kw in runs]


# --------------------------------------------------------------------------------------------
# Independent references (single process, TP=1, PP=1): no cache, no padding, no generation code.


def naive_logits(model, ids: list[int]) -> torch.Tensor:
    """[s, V] full-vocabulary logits of one unpadded sequence, plain causal forward."""
    s = len(ids)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(s)[None], mask, runtime_gather_output=True)[0]


def naive_greedy(model, ids: list[int], n: int, vocab_size: int, eos: tuple = ()) -> tuple[list[int], list[float]]:
    ids, out, lps = list(ids), [], []
    for _ in range(n):
        z = naive_logits(model, ids)[-1, :vocab_size].float()
        tok = int(z.argmax())
        out.append(tok)
        lps.append(float(torch.log_softmax(z, -1)[tok]))
        ids.append(tok)
        if tok in eos:
            break
    return out, lps


def single_process_checks() -> dict:
    """TP=1/PP=1: the suite, the naive references, and the checks that need one process only."""
    from megatron_opcd.generation import SamplingParams, generate, score
    from megatron_opcd.training.engine import wrap_ddp

    res = {"suite": suite(1, 1)}
    model, cfg, groups = _model(1, 1)
    model.eval()
    v = cfg.vocab_size
    greedy = SamplingParams(max_new_tokens=N, greedy=True)
    res["naive"] = [naive_greedy(model, p, N, v) for p in PROMPTS]
    res["naive_prefix"] = [naive_greedy(model, PREFIX + p, N, v) for p in PROMPTS]
    res["one_by_one"] = [generate(model, [p], greedy, groups=groups, vocab_size=v).responses[0] for p in PROMPTS]
    res["nocache"] = generate(model, PROMPTS, greedy, groups=groups, vocab_size=v, use_cache=False).responses
    res["ddp"] = generate(wrap_ddp(model, groups), PROMPTS, greedy, groups=groups, vocab_size=v).responses
    # A prefix shorter than the padding between it and the shortest prompt.
    res["short_prefix"] = generate(model, PROMPTS, greedy, groups=groups, vocab_size=v, prefix=PREFIX[:3]).responses
    res["naive_short_prefix"] = [naive_greedy(model, PREFIX[:3] + p, N, v)[0] for p in PROMPTS]
    # Empty prompts continue straight from the prefix.
    res["empty_prompt"] = generate(model, [[], [4, 4]], greedy, groups=groups, vocab_size=v, prefix=PREFIX).responses
    res["naive_empty_prompt"] = [naive_greedy(model, PREFIX, N, v)[0], naive_greedy(model, PREFIX + [4, 4], N, v)[0]]

    # Score: the logits of the packed [prefix; prompt; response] at the response positions.
    naive_score = []
    for p, r in zip(PROMPTS, RESPONSES):
        z = naive_logits(model, PREFIX + p + r)  # [s, V]
        start = len(PREFIX) + len(p) - 1
        naive_score.append(z[start : start + len(r)])
    res["naive_score_prefix"] = naive_score
    res["naive_score"] = [naive_logits(model, p + r)[len(p) - 1 : len(p) - 1 + len(r)] if r else None
                          for p, r in zip(PROMPTS, RESPONSES)]
    # An empty prompt after the prefix: its first response token is predicted by the prefix's last
    # position, which the batch never runs (the PrefixCache's logits).
    empty = ([[], [4, 4]], [[8, 9, 10], [11, 12]])
    res["score_empty_prompt"] = score(model, *empty, groups=groups, prefix=PREFIX).logits
    res["naive_score_empty_prompt"] = [naive_logits(model, PREFIX + p + r)[len(PREFIX) + len(p) - 1:][: len(r)]
                                       for p, r in zip(*empty)]

    # Sampling: reproducible for a seed, different across seeds; the padded vocabulary never drawn.
    hot = dict(max_new_tokens=24, temperature=50.0)
    runs = [generate(model, PROMPTS * 2, SamplingParams(**hot, seed=s), groups=groups, vocab_size=v).responses
            for s in (1, 1, 2)]
    res["seed_runs"] = runs
    res["top_k1"] = generate(model, PROMPTS, SamplingParams(max_new_tokens=N, temperature=0.7, top_k=1, seed=3),
                             groups=groups, vocab_size=v).responses
    sampled = generate(model, PROMPTS, SamplingParams(max_new_tokens=N, temperature=0.7, seed=4), groups=groups,
                       vocab_size=v)
    # Independent log-probs of the sampled tokens at temperature 0.7.
    res["sampled_t07"] = _out(sampled)
    res["naive_lp_t07"] = [
        [float(torch.log_softmax(naive_logits(model, p + r)[len(p) - 1 + t, :v].float() / 0.7, -1)[r[t]])
         for t in range(len(r))]
        for p, r in zip(PROMPTS, sampled.responses)
    ]

    # Stops: EOS (kept, nothing after it), stop strings, max tokens.
    ref0 = res["naive"][0][0]
    eos_tok = ref0[4]
    res["eos_expect"] = ref0[: ref0.index(eos_tok) + 1]
    res["eos"] = _out(generate(model, PROMPTS, SamplingParams(max_new_tokens=N, greedy=True, eos_ids=(eos_tok,)),
                               groups=groups, vocab_size=v))
    res["eos_naive"] = [naive_greedy(model, p, N, v, eos=(eos_tok,))[0] for p in PROMPTS]
    decode = lambda ids: " ".join(f"<{t}>" for t in ids)  # noqa: E731 - a toy detokenizer
    stop = f"<{ref0[2]}> <{ref0[3]}>"
    res["stop_string"] = stop
    res["stop"] = _out(generate(model, PROMPTS, SamplingParams(max_new_tokens=N, greedy=True, stop_strings=(stop,)),
                                groups=groups, vocab_size=v, decode=decode))
    res["length3"] = _out(generate(model, PROMPTS, SamplingParams(max_new_tokens=3, greedy=True), groups=groups,
                                   vocab_size=v))

    # Learned absolute positions: padding must not shift them.
    lmodel, _, lgroups = _model(1, 1, position_embedding_type="learned_absolute")
    lmodel.eval()
    res["learned"] = generate(lmodel, PROMPTS, greedy, groups=lgroups, vocab_size=v, prefix=PREFIX[:5]).responses
    res["learned_naive"] = [naive_greedy(lmodel, PREFIX[:5] + p, N, v)[0] for p in PROMPTS]
    out = score(lmodel, PROMPTS, RESPONSES, groups=lgroups, prefix=PREFIX[:5])
    pairs = [(out.logits[: len(r), i], naive_logits(lmodel, PREFIX[:5] + p + r)[
        len(PREFIX[:5]) + len(p) - 1 : len(PREFIX[:5]) + len(p) - 1 + len(r)])
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)) if r]
    # Relative to the logits' magnitude: float32 rounding scales with it (tests/_numerics.py).
    res["learned_score_err"] = max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30) for a, b in pairs)

    # Architecture options through the generation kernels (kernels.py), against plain forwards:
    # QKV bias, QK-norm, untied output, biased linears (megatron adds the proj/fc2 bias outside the
    # linear: skip_bias_add), and RoPE on half of each head's channels.
    variants = {"qwen_bias": dict(add_qkv_bias=True, qk_layernorm=True, tie_embeddings=False, add_bias_linear=True),
                "partial_rope": dict(rotary_percent=0.5)}
    res["variants"] = {}
    for name, kwargs in variants.items():
        vmodel, _, vgroups = _model(1, 1, **kwargs)
        vmodel.eval()
        with torch.no_grad():  # biases start at zero: make them matter
            for pname, param in vmodel.named_parameters():
                if pname.endswith("bias"):
                    param.normal_(0.0, 0.3)
        out = score(vmodel, PROMPTS, RESPONSES, groups=vgroups, prefix=PREFIX[:5])
        res["variants"][name] = {
            "greedy": generate(vmodel, PROMPTS, greedy, groups=vgroups, vocab_size=v, prefix=PREFIX[:5]).responses,
            "naive": [naive_greedy(vmodel, PREFIX[:5] + p, N, v)[0] for p in PROMPTS],
            "score_err": max(
                float((out.logits[: len(r), i] - naive_logits(vmodel, PREFIX[:5] + p + r)[
                    5 + len(p) - 1 : 5 + len(p) - 1 + len(r)]).abs().max())
                for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)) if r),
        }
    layer = model.decoder.layers[0]
    leaves = (layer.self_attention.core_attention, layer.self_attention.linear_qkv, layer.mlp.linear_fc2,
              model.output_layer)
    res["native"] = native_kernel_check(model, groups, v)
    # generate/score leave the modules the model was built with, back on megatron's own forward.
    after = (layer.self_attention.core_attention, layer.self_attention.linear_qkv, layer.mlp.linear_fc2,
             model.output_layer)
    res["modules_after"] = [type(m).__mro__[2].__name__ for m in after]  # [subclass, mixin, megatron's class]
    res["same_modules"] = all(a is b for a, b in zip(leaves, after))
    res["stock_forward"] = [getattr(m, "kv_cache", None) is None and getattr(m, "forward_only", None) is None
                            and getattr(m, "_copy", None) is None for m in after]
    return res


def native_kernel_check(model, groups, v: int) -> dict:
    """Greedy decoding of 8 rows (the kernel's unrolled case; 4 rows take its general one) with the
    CPU decode kernel, counted, and with it switched off (`supports` says no: torch matmuls)."""
    from megatron_opcd import native
    from megatron_opcd.generation import SamplingParams, generate

    rows = PROMPTS + [p[::-1] + [3] for p in PROMPTS]
    greedy = SamplingParams(max_new_tokens=N, greedy=True)
    real_linear, real_supports, calls = native.linear_rows, native.supports, []

    def counted(x, w):
        calls.append(x.shape[0])
        return real_linear(x, w)

    native.linear_rows = counted  # kernels calls it through the module: this sees every call
    try:
        on = [generate(model, r, greedy, groups=groups, vocab_size=v) for r in (rows, PROMPTS)]
        native.supports = lambda x, w: False
        off = [generate(model, r, greedy, groups=groups, vocab_size=v) for r in (rows, PROMPTS)]
    finally:
        native.linear_rows, native.supports = real_linear, real_supports
    return {
        "status": native.native_status(),
        "rows_per_call": sorted(set(calls)),
        "same_tokens": [a.responses == b.responses for a, b in zip(on, off)],
        "logprob_err": max(abs(x - y) for a, b in zip(on, off) for ra, rb in zip(a.logprobs, b.logprobs)
                           for x, y in zip(ra, rb)),
    }


# --------------------------------------------------------------------------------------------
# The command line (python -m megatron_opcd.generate)


def cli_errors(workdir: str, ckpt: str) -> dict:
    """Bad inputs: exit code 1 and one line on stderr (they fail before any rank work)."""
    import contextlib
    import io
    from pathlib import Path

    from megatron_opcd.generate import main

    work = Path(workdir)
    cases = {
        "missing": (str(work / "nope.jsonl"), ckpt),
        "malformed": (_write(work / "bad.jsonl", '{"prompt_ids": [1, 2]}\n{"prompt_ids": [1,\n'), ckpt),
        "text_without_tokenizer": (_write(work / "text.jsonl", '{"prompt": "hello"}\n'), ckpt),
        "out_of_vocab": (_write(work / "oov.jsonl", '{"prompt_ids": [1, 999]}\n'), ckpt),
        "not_a_checkpoint": (_write(work / "ok.jsonl", '{"prompt_ids": [1]}\n'), str(work)),
    }
    out = {}
    for name, (prompts, ck) in cases.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["--ckpt", ck, "--prompts", prompts, "--out", str(work / "x.jsonl"), "--no-progress"])
        out[name] = (rc, err.getvalue())
    return out


def _write(path, text: str) -> str:
    """Write `text` to `path` atomically: every rank writes the same file, and a plain write_text
    (truncate, then write) let another rank read it empty ("holds no prompts", seen in a CI run)."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return str(path)


def cli_run(workdir: str, ckpt: str, tp: int = 1, pp: int = 1, extra: tuple = ()) -> list[dict]:
    """Run the CLI on PROMPTS (as prompt_ids lines) with the greedy settings of `suite`."""
    import json
    from pathlib import Path

    from megatron_opcd.generate import main

    work = Path(workdir)
    prompts = Path(_write(work / "prompts.jsonl", "".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS)))
    out = work / f"out_tp{tp}_pp{pp}.jsonl"
    rc = main(["--ckpt", ckpt, "--prompts", str(prompts), "--out", str(out), "--greedy",
               "--max-new-tokens", str(N), "--tp", str(tp), "--pp", str(pp), "--batch-size", "3",
               "--no-progress", *extra])
    if rc != 0:
        raise RuntimeError(f"CLI exit code {rc}")
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]


def single_process_with_cli(workdir: str) -> dict:
    """`single_process_checks`, then save the model as a checkpoint and sample from it with the CLI."""
    from pathlib import Path

    from megatron_opcd.checkpointing import save_checkpoint

    res = single_process_checks()
    model, cfg, _ = _model(1, 1)
    ckpt = str(Path(workdir) / "ckpt")
    save_checkpoint(ckpt, model, cfg)
    res["cli_errors"] = cli_errors(workdir, ckpt)
    res["cli"] = cli_run(workdir, ckpt)
    return res


def suites_then_cli(runs: list[dict], workdir: str, tp: int, pp: int) -> dict:
    """`many_suites`, then the CLI at TP x PP on the checkpoint `single_process_with_cli` wrote."""
    from pathlib import Path

    suites = many_suites(runs)
    return {"suites": suites, "cli": cli_run(workdir, str(Path(workdir) / "ckpt"), tp=tp, pp=pp)}


def cuda_graph_check() -> dict:
    """On a GPU: the compiled step (mode="reduce-overhead": CUDA graphs) against the eager one, on
    the test model in fp32 (greedy tokens, log-probs) and the step times of both."""
    import time

    from megatron_opcd.generation import SamplingParams, generate

    model, cfg, groups = _model(1, 1)
    assert next(model.parameters()).is_cuda
    res = {}
    for mode in ("never", "always", "always"):  # the second compiled call replays the captured graphs
        params = SamplingParams(max_new_tokens=N, greedy=True, compile_decode=mode)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, PROMPTS, params, groups=groups, vocab_size=cfg.vocab_size)
        torch.cuda.synchronize()
        res.setdefault(mode, []).append({**_out(out), "seconds": time.perf_counter() - start,
                                         "compile_seconds": out.compile_seconds})
    return res
