"""Run megatron-core 0.16.1 on machines without CUDA (development boxes, CI).

megatron-core assumes CUDA in a few dozen places (measured list: ../shared/docs/platform-facts.md).
`apply()` patches exactly those, and only when `torch.cuda.is_available()` is False; on a GPU host
it does nothing. Each patch below names the megatron-core file it serves and why. Nothing outside
`megatron_opcd/compat/` knows about these patches; `check()` (run by the tests) fails loudly if a
target disappeared after a megatron-core upgrade.

Patches (megatron-core 0.16.1):
  1. `_CudaToCpuMode`, a TorchFunctionMode pushed once: tensor factories called with
     `device="cuda"` / `device=torch.cuda.current_device()` and `Tensor.cuda()` / `.to("cuda")`
     land on the CPU. Serves pipeline_parallel/schedules.py (`total_num_tokens`),
     p2p_communication.py, tensor_parallel/{mappings,layers,utils,data}.py, transformer/utils.py
     (default causal mask), optimizer/{optimizer,clip_grads}.py, distributed/param_and_grad_buffer.py,
     models/common/language_module/language_module.py (`.cuda()` of tied embeddings with PP>1).
     It also answers `Tensor.type()` of a floating-point CPU tensor with the CUDA type name, because
     optimizer/clip_grads.py (`clip_grad_by_total_norm_fp32`) asserts
     `param.grad.type() == 'torch.cuda.FloatTensor'` and optimizer/optimizer.py
     (Float16OptimizerWithFloat16Params) accepts only CUDA type names.
  2. `torch.cuda.current_device` returns the CPU device (used as `device=` everywhere above).
  3. `torch.cuda.synchronize` is a no-op: p2p_communication.py, dist_checkpointing/strategies/
     filesystem_async.py (no streams exist on the CPU, so there is nothing to wait for).
  4. `torch.cuda.Event` is an event that is always complete: inference/text_generation_controller.py,
     models/common/model_chunk_schedule_plan.py.
  5. The "CUDA" RNG is the CPU default generator: `torch.cuda.{get_rng_state,set_rng_state,
     manual_seed}` and tensor_parallel/random.py's `_get_cuda_rng_state` / `_set_cuda_rng_state`
     (the stock setter silently queues a lazy call that never runs without CUDA). With this,
     `CudaRNGStatesTracker.fork()` really swaps the generator that CPU ops draw from, so
     model-parallel seeds behave as on GPU. Its warning "CPU RNG state changed within GPU RNG
     context" is then expected and filtered.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

MEGATRON_CORE_VERSION = "0.16.1"

_applied = False

# The CUDA type names that megatron-core's checks accept, by dtype.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int names a CUDA device in torch's API.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placements to the CPU (patch 1)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            # Tensor.cuda(device=None, non_blocking=False): the tensor is already where it can live.
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None and args[0].device.type == "cpu":
                return name
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


class _CompletedEvent:
    """Stands in for torch.cuda.Event on the CPU: every operation is already complete (patch 4)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _ExpectedForkWarning(logging.Filter):
    """Drop tensor_parallel/random.py's warning that is expected once patch 5 is in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _targets():
    """The megatron-core attributes the patches rely on; `check()` verifies each still exists."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as tp_random

    return {
        "megatron.core.tensor_parallel.random._get_cuda_rng_state": (tp_random, "_get_cuda_rng_state"),
        "megatron.core.tensor_parallel.random._set_cuda_rng_state": (tp_random, "_set_cuda_rng_state"),
        "megatron.core.tensor_parallel.random.CudaRNGStatesTracker": (tp_random, "CudaRNGStatesTracker"),
        "megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining": (
            schedules,
            "forward_backward_no_pipelining",
        ),
        "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32": (
            clip_grads,
            "clip_grad_by_total_norm_fp32",
        ),
    }


def check() -> list[str]:
    """Return what no longer matches the megatron-core these patches were written for (empty: all good)."""
    import megatron.core

    problems = []
    version = getattr(megatron.core, "__version__", None)
    if version != MEGATRON_CORE_VERSION:
        problems.append(
            f"megatron-core {version} is installed; megatron_opcd/compat/cpu.py was written for "
            f"{MEGATRON_CORE_VERSION}: re-measure its CUDA assumptions before upgrading the pin"
        )
    for name, (module, attr) in _targets().items():
        if not hasattr(module, attr):
            problems.append(f"{name} no longer exists: the CPU patch for it does not apply")
    return problems


def apply() -> bool:
    """Install the CPU patches once, only without CUDA. Returns True if they are (now) active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    problems = check()
    if problems:
        raise RuntimeError("megatron_opcd.compat: " + "; ".join(problems))
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = lambda: torch.device("cpu")  # patch 2
    torch.cuda.synchronize = lambda device=None: None  # patch 3
    torch.cuda.Event = _CompletedEvent  # patch 4
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # patch 5
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    tp_random._get_cuda_rng_state = _cpu_get_rng_state
    tp_random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(tp_random.__name__).addFilter(_ExpectedForkWarning())
    # Patch 1, pushed for the life of the process (and inherited by autograd's backward pass).
    _CudaToCpuMode().__enter__()
    _applied = True
    return True


def is_applied() -> bool:
    return _applied


@contextmanager
def redirect_suspended():
    """Run the block without patch 1's TorchFunctionMode (no-op where the patches are not applied).

    Only for code that never asks for a CUDA placement by name (`device="cuda"`, `.cuda()`)."""
    if not _applied:
        yield
        return
    with torch._C.DisableTorchFunction():  # skips modes (ours is the only one) and tensor-subclass hooks
        yield
