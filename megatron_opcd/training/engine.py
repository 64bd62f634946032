"""megatron-core's training machinery, wired once: DDP wrapper, pipeline schedule, grad finalize.

`wrap_ddp` puts a student stage in megatron's DistributedDataParallel (gradients in
`param.main_grad`, buckets reduced over DP); `forward_backward` runs megatron's own
forward-backward schedule (no pipelining at PP=1, 1F1B otherwise) with `finalize_model_grads`
(DP all-reduce, TP all-reduce of sequence-parallel/QK-norm grads, tied-embedding sum across the
first and last stages, division by the token count). The loss follows megatron's contract:
`loss_func(output) -> (loss_sum, num_tokens, metrics)` with `calculate_per_token_loss=True`, so
the schedule scales nothing and the division happens once, by the global token count.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterable, Iterator

import torch

from megatron_opcd.compat import mcore
from megatron_opcd.parallel import ParallelGroups


def wrap_ddp(model, groups: ParallelGroups, *, use_distributed_optimizer: bool = False):
    """megatron-core DistributedDataParallel around one model stage.

    The loss contract (`calculate_per_token_loss=True`, see `configure_schedule`) is set on the
    model's config here, before the DDP is built: megatron's DDP reads it once, in its
    constructor, and without it pre-scales every gradient bucket by 1/DP, on top of
    `finalize_model_grads`' division by the global token count (gradients, the logged grad norm
    and SGD's step came out divided by DP; the clip threshold and Adam's eps weighed DP times more)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model.config.calculate_per_token_loss = True

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # Overlap needs CUDA streams; on the CPU communication is synchronous anyway.
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(
        config=model.config, ddp_config=ddp_config, module=model, pg_collection=groups.pg_collection
    )
    return ddp


def configure_schedule(model_chunks: list, groups: ParallelGroups) -> None:
    """Set the TransformerConfig hooks megatron's schedules read (once per model)."""
    from megatron.core.distributed import finalize_model_grads

    config = model_chunks[0].config
    if hasattr(model_chunks[0], "no_sync") and not config.calculate_per_token_loss:
        # A DDP built for the other contract has pre-scaled its buckets by 1/DP already.
        raise RuntimeError("configure_schedule: the DDP was built without calculate_per_token_loss; "
                           "wrap the model with engine.wrap_ddp")
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=groups.pg_collection)
    if hasattr(model_chunks[0], "no_sync"):
        config.no_sync_func = model_chunks[0].no_sync
        config.grad_sync_func = None


def forward_backward(
    model,
    forward_step_func: Callable,
    microbatches: Iterable,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list:
    """Run megatron's schedule over `microbatches`; return the per-microbatch metrics dicts
    (on the last pipeline stage; empty lists elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data_iterator: Iterator = iter(microbatches)
    fb = get_forward_backward_func()
    return fb(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def zero_grads(model) -> None:
    """Clear gradients: megatron DDP's buffers and every `.grad`.

    The `.grad = None` matters: megatron's optimizer step aliases `param.grad` to `param.main_grad`;
    a stale alias makes the next backward accumulate into the buffer twice (autograd adds into
    the alias, then DDP's hook adds `.grad` to `main_grad` again). Megatron-LM's loop calls
    `optimizer.zero_grad()` for the same reason.
    """
    mcore.zero_grad_buffer(model)
    for param in model.parameters():
        param.grad = None


def main_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient megatron accumulated for `param` (DDP's main_grad, else .grad)."""
    return mcore.main_grad(param)


@contextmanager
def response_outputs(model, index: torch.Tensor):
    """Inside the block, the output layer of `model` (a last pipeline stage; megatron wrappers
    allowed) computes only the positions of `index` (`[R, b]`, row t of column i = the position
    whose output predicts response token t of sequence i; negative entries read position 0), and
    the model returns them aligned, `[R, b, v/tp]`, instead of `[b, S, v/tp]`. Yields True where
    it did, False where it cannot (then the model returns `[b, S, v/tp]` as usual and the caller
    gathers): with multi-token prediction (the output layer also runs on the MTP heads' states).

    The loss reads only the response positions: the prompt's logits would cost the output layer's
    matmuls forward and backward, and reordering `[b, S, V]` logits into the loss's `[R, b, V]`
    would cost a copy of the largest tensor of the step each way. Gathering the `[S, b, h]`
    hidden states instead moves `h` numbers a position rather than `V`; and since megatron's
    GPTModel returns `logits.transpose(0, 1).contiguous()`, the output hook hands it the
    transposed view of the contiguous `[R, b, V]` logits, so that `.contiguous()` copies nothing.
    megatron slices the hidden states before the output layer the same way for inference
    (`materialize_only_last_token_logits`).

    With sequence parallelism the hidden states arrive split along the sequence, `[S/tp, b, h]`:
    they are gathered first (megatron's `gather_from_sequence_parallel_region`), the response
    rows picked, and the output layer runs on those whole rows with its sequence-parallel gather
    off for that call, as megatron's GPTModel does for dynamic-batching inference. Gradients: the
    layer then all-reduces its input gradient over TP (as at TP without SP), so the gather's
    backward only takes this rank's slice (`tensor_parallel_output_grad=False`; a reduce-scatter
    there would sum the already summed gradient TP times)."""
    from megatron_opcd.checkpointing import unwrap
    from megatron_opcd.data.packing import response_rows

    module = unwrap(model)
    layer = mcore.output_layer(module)
    config = getattr(module, "config", None)
    if layer is None or getattr(config, "mtp_num_layers", None):
        yield False
        return
    split = bool(getattr(layer, "sequence_parallel", False))

    def rows(hidden):  # GPTModel hands the hidden states [S(/tp), b, h] over positionally
        if split:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=layer.tp_group)  # [S, b, h]
            layer.sequence_parallel = False  # the rows are whole now: no second gather in the layer
        return response_rows(hidden, index)  # [R, b, h]

    def logits(x):  # [R, b, v]
        layer.sequence_parallel = split
        return x.transpose(0, 1)

    handles = mcore.hook_output_layer(layer, hidden=rows, logits=logits)
    try:
        yield True
    finally:
        layer.sequence_parallel = split  # also when the forward raised between the hooks
        for handle in handles:
            handle.remove()
