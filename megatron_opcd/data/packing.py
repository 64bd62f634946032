"""Right-padded [prompt; response] batches and the response-aligned view of their logits.

The teacher sees [context; prompt; response], the student [prompt; response]. Both are packed
with this one function, so the logits that predict response token t of sequence i sit at row t,
column i of the aligned tensor `[R, b, v/tp]` for both models, whatever the prompt, context and
padding lengths. The loss then compares the two aligned tensors position by position.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch


@dataclass
class PackedBatch:
    tokens: torch.Tensor
    """[b, S] int64, right-padded with `pad_id`."""

    position_ids: torch.Tensor
    """[b, S] int64, starting at `position_offset` (the length of a cached shared prefix)."""

    attention_mask: torch.Tensor
    """[b, 1, S, S] bool, megatron's convention (True = masked): causal and padding."""

    lengths: torch.Tensor
    """[b] int64, real tokens per row."""

    response_index: torch.Tensor
    """[R, b] int64: position whose output predicts response token t (0 where masked)."""

    response_mask: torch.Tensor
    """[R, b] float32: 1 for real response tokens."""

    response_tokens: torch.Tensor
    """[R, b] int64: the response tokens (pad where masked)."""

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "PackedBatch":
        """The same batch with every tensor on `device` (packing happens on the host)."""
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def causal_padding_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[b, 1, S, S] bool, True = masked: future positions, and keys past a row's length.

    Query rows past a row's length attend to position 0 only, which keeps their softmax finite
    (their outputs are never used).
    """
    causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)  # [S, S]
    key_pad = torch.arange(seq_len)[None, :] >= lengths[:, None]  # [b, S]
    mask = causal[None] | key_pad[:, None, :]  # [b, S, S]
    mask[:, :, 0] = False
    return mask[:, None]


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    position_offset: int = 0,
    pad_to_multiple: int = 1,
) -> PackedBatch:
    """Pack `prompt_i + response_i` rows. Every prompt needs at least one token (the response's
    first token is predicted by the prompt's last position), unless `position_offset` > 0, i.e.
    a cached prefix precedes the row: then the prefix's last position predicts it (index -1,
    see `gather_response`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [[(list(p), False), (list(r), True)] for p, r in zip(prompts, responses)]
    return pack_segments(rows, pad_id=pad_id, position_offset=position_offset, pad_to_multiple=pad_to_multiple)


def pack_segments(
    rows: Sequence[Sequence[tuple[Sequence[int], bool]]],
    *,
    pad_id: int = 0,
    position_offset: int = 0,
    pad_to_multiple: int = 1,
) -> PackedBatch:
    """Pack rows made of segments `(token_ids, trained)`; the "response" of a row is every token
    of its trained segments, in order (a multi-turn transcript: the student's turns are trained,
    the environment's and the template's tokens are not). `pack` is the one-prompt-one-response
    case. The aligned view has one row per trained token, so teacher and student transcripts that
    differ only by untrained segments (the context) line up token for token."""
    b = len(rows)
    flat = [[t for ids, _ in row for t in ids] for row in rows]
    lengths = torch.tensor([len(f) for f in flat], dtype=torch.long)
    seq = max(1, int(lengths.max()) if b else 1)
    seq = -(-seq // pad_to_multiple) * pad_to_multiple
    tokens = torch.full((b, seq), pad_id, dtype=torch.long)
    for i, row in enumerate(flat):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    positions_of = []  # per row: the positions of its trained tokens
    for i, row in enumerate(rows):
        pos, at = [], 0
        for ids, on in row:
            if on:
                pos.extend(range(at, at + len(ids)))
            at += len(ids)
        if pos and pos[0] == 0 and position_offset == 0:
            raise ValueError(f"row {i} starts with a trained token and has no cached prefix: nothing predicts it")
        positions_of.append(pos)
    r_max = max([1] + [len(p) for p in positions_of])
    index = torch.zeros(r_max, b, dtype=torch.long)
    mask = torch.zeros(r_max, b, dtype=torch.float32)
    resp = torch.full((r_max, b), pad_id, dtype=torch.long)
    for i, pos in enumerate(positions_of):
        if not pos:
            continue
        n = len(pos)
        p = torch.tensor(pos, dtype=torch.long)
        index[:n, i] = p - 1  # the position before a token predicts it (-1: the cached prefix's last)
        mask[:n, i] = 1.0
        resp[:n, i] = tokens[i, p]
    positions = torch.arange(seq)[None].expand(b, seq) + position_offset
    return PackedBatch(
        tokens=tokens,
        position_ids=positions.contiguous(),
        attention_mask=causal_padding_mask(lengths, seq),
        lengths=lengths,
        response_index=index,
        response_mask=mask,
        response_tokens=resp,
    )


def response_rows(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sequence-first `[S, b, ...]` -> `[R, b, ...]`: row t of column i is `states[index[t, i], i]`
    (`index` a `PackedBatch.response_index`; negative entries, a cached prefix's last position,
    read position 0 and are the caller's to replace). Advanced indexing allocates only the result."""
    idx = index.to(states.device).clamp(min=0)  # [R, b]
    return states[idx, torch.arange(idx.shape[1], device=states.device)[None, :]]


def gather_response(logits_bsv: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """[b, S, v] logits -> [R, b, v] aligned to the response tokens (rows past a response's end
    hold junk and are masked by `packed.response_mask`).

    Where the output layer can run on the response positions alone, the models return this layout
    directly (`stage.forward_stage(rows=...)`, `training.engine.response_outputs`: `response_rows`
    of the hidden states); this is the gather for the other cases (sequence parallelism,
    multi-token prediction)."""
    return response_rows(logits_bsv.transpose(0, 1), packed.response_index).contiguous()  # [R, b, v]
