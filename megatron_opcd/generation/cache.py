"""The KV cache of the generation loop: rotated keys and values per attention layer.

Why our own cache and not megatron-core's `StaticInferenceContext` (what the first version used;
measured in docs/generation.md): megatron 0.16.1 keeps keys *before* RoPE and re-rotates the whole
cache in every layer at every step, and expands grouped K/V heads with `repeat_interleave` every
step. Here a key is rotated once, when it is written, with the *position* of its token (so a row
may be padded anywhere); `models.kernels.KVCacheAttention` writes and reads this cache.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Keys and values of `batch` rows x `max_seq` slots for every attention layer of one stage.

    Buffers are `[b, groups/tp, slots, head_dim]` per layer (the layout SDPA reads), allocated on
    first write and zeroed: a masked slot gets weight exactly 0, but 0 x NaN from uninitialised
    memory would still poison the output. Slots `[0, offset)` are filled; a forward of `s` tokens
    writes `[offset, offset + s)` in every layer and the caller then calls `end_forward(s)`.

    A prefix that every query of every row sees whole can be *shared* (`load_prefix(...,
    shared=True)`): its keys and values stay one `[1, g, P, d]` copy (the `PrefixCache`'s own
    tensors, never written), the rows' buffers hold slots `[P, max_seq)` only, and attention reads
    the prefix once for all rows (`models.kernels.KVCacheAttention`, cascade attention). Masks keep
    covering all slots `[0, offset + s)`; `set_inputs` checks the prefix columns are all visible.

    Per forward, `stage.forward_stage` also sets what every layer shares (`set_inputs`): the
    additive mask `bias` (see there) and `cos`/`sin`, the rotary factors of the new tokens
    `[s, b, 1, rot_dim]` in the model's dtype (None without RoPE)."""

    def __init__(self, batch: int, max_seq: int):
        self.batch, self.max_seq = batch, max_seq
        self.offset = 0
        # The compiled decode step (generation/compiled.py) writes at a slot *tensor* and attends over
        # a fixed `span` of slots, so its shapes do not change from step to step: see `write`.
        self.slot: Optional[torch.Tensor] = None  # [1] int64 while a static step runs
        self.span = 0
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shared: Optional[dict] = None  # layer -> (keys, values) [1, g, P, d] of a shared prefix
        self.shared_len = 0  # P when a prefix is shared: the rows' buffers start at slot P
        self.bias: Optional[torch.Tensor] = None
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `key`/`value` (`[s, b, g, d]`, keys rotated) at slots [offset, offset + s) of
        `layer`; return that layer's keys and values for the rows' slots up to offset + s
        (`[0, offset + s)`, or `[P, offset + s)` when a prefix of P slots is shared)."""
        end = self.offset + key.shape[0]
        if end > self.max_seq:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, {self.max_seq} allocated")
        if layer not in self.layers:
            shape = (self.batch, key.shape[2], self.max_seq - self.shared_len, key.shape[3])
            self.layers[layer] = (key.new_zeros(shape), value.new_zeros(shape))
        k, v = self.layers[layer]
        start, end = self.offset - self.shared_len, end - self.shared_len
        k[:, :, start:end] = key.permute(1, 2, 0, 3)  # [s, b, g, d] -> [b, g, s, d]
        v[:, :, start:end] = value.permute(1, 2, 0, 3)
        return k[:, :, :end], v[:, :, :end]

    def write_static(self, buffers: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor):
        """The static step's write: one token per row at slot `self.slot` (a tensor, so the traced
        step is the same at every slot), in place into one layer's preallocated `buffers` (an entry
        of `layers`, handed to its attention core: generation/loop.py); attention then reads the
        first `span` slots (a bucket: a constant of the compiled graph), the unwritten ones masked.
        Only without a shared prefix (the compiled step copies it into the rows)."""
        k, v = buffers
        k.index_copy_(2, self.slot, key.permute(1, 2, 0, 3))  # [1, b, g, d] -> [b, g, 1, d] at the slot
        v.index_copy_(2, self.slot, value.permute(1, 2, 0, 3))
        return k[:, :, : self.span], v[:, :, : self.span]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (`[b']` int64) of every layer's buffers: the batch compacts when rows
        finish (generation/loop.py), so they stop costing compute."""
        self.layers = {layer: (k.index_select(0, rows), v.index_select(0, rows)) for layer, (k, v) in self.layers.items()}
        self.batch = int(rows.numel())

    def set_inputs(self, masked: torch.Tensor, angles: Optional[torch.Tensor], heads_per_group: int,
                   dtype: torch.dtype) -> None:
        """Prepare, once per forward, what every layer's attention reads.

        `angles` (`[s, b, 1, rot_dim]`, None without RoPE) become cos/sin in the model's dtype, as
        megatron's `apply_rotary_pos_emb` casts them.

        `masked` is megatron's `[b, 1, s, offset + s]` bool (True = masked). SDPA gets it as an
        additive `[b, 1, r*s, offset + s]` float mask in the layout of grouped queries: the `r`
        query heads of one KV group are folded into the query axis (`models.kernels.KVCacheAttention`),
        so attention reads each group's keys once, with no GQA expansion (measured 1.8x faster
        than SDPA's `enable_gqa` with a bool mask for a decode step). Masked entries get the
        dtype's lowest finite value rather than -inf: a row can never turn into NaN."""
        if self.shared is not None:
            p = self.shared_len
            if bool(masked[..., :p].any()):
                raise RuntimeError("a query masks part of the shared prefix: load it with shared=False")
            masked = masked[..., p:]  # the rows' own slots; every query sees the whole prefix
        bias = torch.zeros(masked.shape, dtype=dtype, device=masked.device)
        bias.masked_fill_(masked, torch.finfo(dtype).min)
        b, _, s, sk = bias.shape
        if heads_per_group > 1 and s > 1:  # one query row broadcasts over the r heads by itself
            bias = bias.unsqueeze(2).expand(b, 1, heads_per_group, s, sk).reshape(b, 1, heads_per_group * s, sk)
        self.bias = bias
        self.cos = self.sin = None
        if angles is not None:
            self.cos, self.sin = torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)

    def end_forward(self, s: int) -> None:
        """Slots [offset, offset + s) are written in every layer: move past them."""
        self.offset += s
        self.bias = self.cos = self.sin = None

    def load_prefix(self, prefix_kv: dict, length: int, shared: bool = False) -> None:
        """Put a batch-1 prefix (`PrefixCache.kv`: layer -> keys, values `[1, g, P, d]`) at slots
        [0, P) of every row and move the offset past it. Keys were rotated with positions
        0..P-1, which is where the prefix sits in every row. `shared=True` keeps the one copy
        (every query must see the whole prefix); otherwise it is copied into every row."""
        if self.offset != 0:
            raise RuntimeError("load_prefix needs an empty cache")
        if shared:
            self.shared, self.shared_len, self.offset = dict(prefix_kv), length, length
            return
        for layer, (pk, pv) in prefix_kv.items():
            shape = (self.batch, pk.shape[1], self.max_seq, pk.shape[3])
            k, v = pk.new_zeros(shape), pv.new_zeros(shape)
            k[:, :, :length] = pk  # broadcast over rows
            v[:, :, :length] = pv
            self.layers[layer] = (k, v)
        self.offset = length

    def prefix_kv(self, length: int) -> dict:
        """Row 0's keys/values of slots [0, length), cloned (what `PrefixCache` keeps)."""
        if self.shared is not None:
            raise RuntimeError("prefix_kv reads a cache without a shared prefix")
        return {layer: (k[:1, :, :length].clone(), v[:1, :, :length].clone()) for layer, (k, v) in self.layers.items()}
