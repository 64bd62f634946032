"""Rank functions for tests/test_convert.py (module level: the launcher pickles them by reference).

`many_cases` runs several cases in one launch (process start-up is the expensive part on 2 cores).
A case builds a megatron model at some TP/PP layout, fills it (from an HF folder through
`load_hf_state_into_megatron`, from a checkpoint, or with the layout-invariant random init that
stands in for a trained student), and returns full-vocabulary logits on a fixed batch and greedy
tokens from a plain full-forward loop (no KV cache), both from TP rank 0 of the last stage.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch


def causal_mask(b: int, s: int) -> torch.Tensor:
    # megatron's convention: True = masked out. [b, 1, s, s]
    return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None].expand(b, 1, s, s)


def _gather_vocab(logits: torch.Tensor, groups) -> torch.Tensor:
    """[b, s, v/tp] -> [b, s, v] (the vocabulary is split contiguously over TP)."""
    if groups.tp_size == 1:
        return logits
    pieces = [torch.empty_like(logits) for _ in range(groups.tp_size)]
    torch.distributed.all_gather(pieces, logits.contiguous(), group=groups.tp_group)
    return torch.cat(pieces, dim=-1)


def _logits_step(groups, data_iterator, model):
    tokens = next(data_iterator)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = model(tokens, pos, causal_mask(*tokens.shape))

    def collect(output):
        full = _gather_vocab(output.detach(), groups)
        return torch.zeros(()), torch.ones((), dtype=torch.int), {"logits": full}

    return out, collect


def full_logits(model, groups, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """[b, s, padded_vocab] on the last stage (None elsewhere), through megatron's schedule (PP too)."""
    from megatron_opcd.training.engine import forward_backward

    b, s = tokens.shape
    out = forward_backward(model, partial(_logits_step, groups), [tokens], num_microbatches=1, seq_length=s,
                           micro_batch_size=b, forward_only=True)
    return out[0]["logits"] if groups.is_last_stage else None


def greedy(model, groups, prompts: torch.Tensor, new_tokens: int, vocab_size: int) -> torch.Tensor:
    """Greedy continuation by re-running the whole sequence each step; [b, s + new_tokens]."""
    seq = prompts.clone()
    for _ in range(new_tokens):
        logits = full_logits(model, groups, seq)
        nxt = torch.zeros(seq.shape[0], 1, dtype=seq.dtype)
        if logits is not None:
            # Padded vocabulary rows are never predicted.
            nxt = logits[:, -1, :vocab_size].argmax(-1, keepdim=True).to(seq.dtype)
        if groups.pp_size > 1:
            torch.distributed.broadcast(nxt, src=groups.pp_last_global_rank, group=groups.pp_group)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def run_case(tp: int, pp: int, tokens: torch.Tensor, prompts: torch.Tensor, new_tokens: int,
             hf_dir: Optional[str] = None, load_dir: Optional[str] = None, random_config: Optional[dict] = None,
             as_dict: bool = False, save_dir: Optional[str] = None, tokenizer_dir: Optional[str] = None,
             compare_dirs: Optional[tuple] = None, divisible_by: int = 64, ep: int = 1,
             etp: Optional[int] = None) -> dict:
    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import load_model_weights, read_model_config, save_checkpoint
    from megatron_opcd.config import ModelConfig, ParallelConfig
    from megatron_opcd.convert import HFReader, load_hf_state_into_megatron, model_config_from_hf
    from megatron_opcd.convert.hf_files import read_hf_config
    from megatron_opcd.models import build_model
    from megatron_opcd.training.engine import configure_schedule

    groups = parallel.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                expert_model_parallel_size=ep, expert_tensor_parallel_size=etp))
    if compare_dirs is not None:
        return _compare_checkpoints(*compare_dirs)
    if hf_dir is not None:
        cfg = model_config_from_hf(read_hf_config(hf_dir), make_vocab_size_divisible_by=divisible_by)
    elif load_dir is not None:
        cfg = read_model_config(load_dir)
    else:
        cfg = ModelConfig(**random_config)
    model = build_model(cfg, "teacher", groups=groups, init=hf_dir is None and load_dir is None, seed=11)
    if hf_dir is not None:
        if as_dict:
            from safetensors.torch import load_file

            load_hf_state_into_megatron(model, load_file(f"{hf_dir}/model.safetensors"), cfg, groups)
        else:
            with HFReader(hf_dir) as reader:
                load_hf_state_into_megatron(model, reader.get, cfg, groups)
    if load_dir is not None:
        load_model_weights(model, load_dir)
    if save_dir is not None:
        save_checkpoint(save_dir, model, cfg, tokenizer_dir=tokenizer_dir, meta={"written_by": "test trainer"})
    configure_schedule([model], groups)
    logits = full_logits(model, groups, tokens)
    seq = greedy(model, groups, prompts, new_tokens, cfg.vocab_size)
    out = {"tp_rank": groups.tp_rank, "last": groups.is_last_stage, "greedy": seq}
    if logits is not None:
        out["logits"] = logits[..., : cfg.vocab_size].clone()
        out["padded_logits"] = logits[..., cfg.vocab_size:].clone()
    return out


def _compare_checkpoints(dir_a: str, dir_b: str) -> dict:
    """Load two checkpoints at this layout; report parameters that are not bit-identical."""
    from megatron_opcd.checkpointing import load_model_weights, read_model_config
    from megatron_opcd.models import build_model
    from megatron_opcd.models.sharding import global_named_parameters

    weights = []
    for d in (dir_a, dir_b):
        model = build_model(read_model_config(d), "teacher", init=True, seed=99)
        load_model_weights(model, d)
        weights.append({n: p.detach().clone() for n, p in global_named_parameters(model)})
    a, b = weights
    return {"names": sorted(a), "same_names": set(a) == set(b),
            "different": sorted(n for n in a if n in b and not torch.equal(a[n], b[n]))}


def many_cases(cases: list[dict]) -> list:
    """Run every case in one launch; a case with `kind="dict_error"` calls `dict_load_error`."""
    out = []
    for kw in cases:
        kw = dict(kw)
        kind = kw.pop("kind", "case")
        out.append(dict_load_error(**kw) if kind == "dict_error" else run_case(**kw))
    return out


def dict_load_error(hf_dir: str, extra: str) -> str:
    """load_hf_state_into_megatron with a dict holding a tensor the architecture does not use."""
    from safetensors.torch import load_file

    from megatron_opcd import parallel
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.convert import load_hf_state_into_megatron, model_config_from_hf
    from megatron_opcd.convert.hf_files import read_hf_config
    from megatron_opcd.errors import ConversionError
    from megatron_opcd.models import build_model

    groups = parallel.initialize(ParallelConfig())
    cfg = model_config_from_hf(read_hf_config(hf_dir), make_vocab_size_divisible_by=64)
    model = build_model(cfg, "teacher", groups=groups, init=False)
    state = load_file(f"{hf_dir}/model.safetensors")
    state[extra] = torch.ones(cfg.head_dim)
    try:
        load_hf_state_into_megatron(model, state, cfg, groups)
    except ConversionError as exc:
        return str(exc)
    return "no error"
