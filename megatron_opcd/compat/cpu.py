"""Run megatron-core on machines without CUDA (development boxes, CI), keyed by version.

megatron-core assumes CUDA in a few dozen places (measured list: docs/compatibility.md).
`enable()` (`megatron_opcd.compat.enable_cpu()`, called by the entry points on a host without
CUDA) patches exactly those; on a GPU host it does nothing. Nothing outside `megatron_opcd/compat/`
knows what these patches are.

`PATCHES` lists each patch with the megatron-core releases it applies to (a PEP 440 specifier)
and the megatron-core names it serves (`targets`). `check()` resolves every target of every patch
that applies to the installed release and reports what no longer exists. Measured on the releases
CI runs (`TESTED`: 0.16.1 on Python 3.11, 0.19.2 on Python 3.12); a release CI has not run (an
untested one inside setup.py's range, or a newer one) runs with a one-time warning naming the
targets that were checked, not a refusal: its new CUDA assumptions, if any, fail where they are
hit, with torch's CUDA error ("Torch not compiled with CUDA enabled" from a CPU build, "Found no
NVIDIA driver" from a CUDA build).

The patches:
  cuda_to_cpu_mode  `_CudaToCpuMode`, a TorchFunctionMode pushed once: tensor factories called with
     `device="cuda"` / `device=torch.cuda.current_device()` and `Tensor.cuda()` / `.to("cuda")`
     land on the CPU. Serves pipeline_parallel/schedules.py (`total_num_tokens`),
     p2p_communication.py, tensor_parallel/{mappings,layers,utils,data}.py, transformer/utils.py
     (default causal mask), optimizer/{optimizer,clip_grads}.py, distributed/param_and_grad_buffer.py,
     models/common/language_module/language_module.py (`.cuda()` of tied embeddings with PP>1).
     It also answers `Tensor.type()` of a floating-point CPU tensor with the CUDA type name, because
     optimizer/clip_grads.py (`clip_grad_by_total_norm_fp32`) asserts
     `param.grad.type() == 'torch.cuda.FloatTensor'` and optimizer/optimizer.py
     (Float16OptimizerWithFloat16Params) accepts only CUDA type names.
  current_device  `torch.cuda.current_device` returns the CPU device (used as `device=` everywhere
     above).
  synchronize  `torch.cuda.synchronize` is a no-op: p2p_communication.py, dist_checkpointing/
     strategies/filesystem_async.py (no streams exist on the CPU, so there is nothing to wait for).
  event  `torch.cuda.Event` is an event that is always complete: inference/
     text_generation_controller.py, models/common/model_chunk_schedule_plan.py.
  rng  The "CUDA" RNG is the CPU default generator: `torch.cuda.{get_rng_state,set_rng_state,
     manual_seed}` and tensor_parallel/random.py's `_get_cuda_rng_state` / `_set_cuda_rng_state`
     (the stock setter silently queues a lazy call that never runs without CUDA). With this,
     `CudaRNGStatesTracker.fork()` really swaps the generator that CPU ops draw from, so
     model-parallel seeds behave as on GPU. Its warning "CPU RNG state changed within GPU RNG
     context" is then expected and filtered.
  current_stream  (0.17 on; measured on 0.19.2) `torch.cuda.current_stream()` is a stream on which
     everything is already complete: distributed/param_and_grad_buffer.py's
     `_ParamAndGradBucketGroup.start_grad_sync` asks for it on every gradient reduction (0.16.1
     does not). Applied from 0.17 because 0.17/0.18 are in range but not measured, and the stand-in
     only replaces a call that would raise without CUDA.
  moe_streams  (measured on 0.16.1 and 0.19.2) `torch.cuda.Stream` builds a completed stream,
     `torch.cuda.stream(s)` is a no-op context and `torch.cuda.current_stream()` the completed
     stream: the MoE all-to-all token dispatcher (transformer/moe/token_dispatcher.py) creates a
     side stream in `MoEAlltoAllTokenDispatcher.__init__` and moves its split sizes to the host on it
     in `_maybe_dtoh_and_synchronize` at every forward without capacity (moe_utils.py's
     `maybe_move_tensor_to_cpu` does nothing for a CPU tensor). The rest of the MoE path (router,
     experts, permutation, aux-loss tracker) is served by current_device and cuda_to_cpu_mode.
  moe_host_splits  (measured on 0.16.1 and 0.19.2) moe_utils.py's `maybe_move_tensor_to_cpu`
     (also bound by name in token_dispatcher.py) turns the all-to-all split sizes into the numpy
     arrays that `all_to_all_single` takes, but only for a CUDA tensor: a CPU tensor stays a
     tensor, which torch's binding refuses ("incompatible function arguments"). The stand-in does
     the same for CPU tensors (what megatron does after its device-to-host copy).
  moe_utils_without_te  (needed on 0.16.1; a no-op on 0.19.2, which defines them as None) transformer/moe/moe_utils.py imports
     te_general_gemm and the fused permute/top-k/aux-loss kernels only inside `try: import
     transformer_engine`, with no fallback, yet the router's `RouterGatingLinearFunction` reads
     `te_general_gemm` at every forward: NameError without TE. The missing names are set to None,
     which is what the code tests for (`if te_general_gemm is not None`). Not CUDA, but a machine
     without TE; a GPU host without TE would need the same (the CLIs enable CPU mode only without CUDA).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

# The range setup.py declares (tests/test_models.py checks they agree) and the releases CI runs.
SUPPORTED = ">=0.16.1,<0.20"
TESTED = ("0.16.1", "0.19.2")

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


class _CompletedStream:
    """Stands in for torch.cuda.current_stream() / torch.cuda.Stream() on the CPU: nothing is
    queued, nothing waits (patches current_stream, moe_streams)."""

    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CompletedEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _ExpectedForkWarning(logging.Filter):
    """Drop tensor_parallel/random.py's warning that is expected once patch 5 is in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _install_cuda_to_cpu_mode():
    # Pushed for the life of the process (and inherited by autograd's backward pass).
    _CudaToCpuMode().__enter__()


def _install_current_device():
    torch.cuda.current_device = lambda: torch.device("cpu")


def _install_synchronize():
    torch.cuda.synchronize = lambda device=None: None


def _install_event():
    torch.cuda.Event = _CompletedEvent


def _install_rng():
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    tp_random._get_cuda_rng_state = _cpu_get_rng_state
    tp_random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(tp_random.__name__).addFilter(_ExpectedForkWarning())


def _install_current_stream():
    stream = _CompletedStream()
    torch.cuda.current_stream = lambda device=None: stream


def _install_moe_streams():
    from contextlib import nullcontext

    _install_current_stream()
    torch.cuda.Stream = _CompletedStream
    torch.cuda.stream = lambda stream=None: nullcontext()


def _host_tensor(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _install_moe_host_splits():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = _host_tensor
    token_dispatcher.maybe_move_tensor_to_cpu = _host_tensor


_MOE_TE_NAMES = ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                 "fused_topk_with_score_function", "fused_unpermute", "te_general_gemm")


def _install_moe_utils_without_te():
    from megatron.core.transformer.moe import moe_utils

    for name in _MOE_TE_NAMES:
        if not hasattr(moe_utils, name):  # defined where TE imported: left alone
            setattr(moe_utils, name, None)


@dataclass(frozen=True)
class Patch:
    """One CPU patch: the megatron-core releases it applies to and the names it serves."""

    name: str
    versions: str  # PEP 440 specifier over megatron-core releases
    targets: tuple[str, ...]  # dotted megatron-core names; each must exist where the patch applies
    install: Callable[[], None]


_MP = "megatron.core."
# Installed in this order (the mode last: the installs above it must not be redirected).
PATCHES = (
    Patch("current_device", ">=0.16.1", (_MP + "tensor_parallel.layers.ColumnParallelLinear",
                                         _MP + "tensor_parallel.mappings.gather_from_tensor_model_parallel_region"),
          _install_current_device),
    Patch("synchronize", ">=0.16.1", (_MP + "pipeline_parallel.p2p_communication",
                                      _MP + "dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync"),
          _install_synchronize),
    Patch("event", ">=0.16.1", (_MP + "models.common.model_chunk_schedule_plan",), _install_event),
    Patch("rng", ">=0.16.1", (_MP + "tensor_parallel.random._get_cuda_rng_state",
                              _MP + "tensor_parallel.random._set_cuda_rng_state",
                              _MP + "tensor_parallel.random.CudaRNGStatesTracker"),
          _install_rng),
    Patch("current_stream", ">=0.17", (_MP + "distributed.param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync",),
          _install_current_stream),
    Patch("moe_streams", ">=0.16.1", (_MP + "transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher."
                                            "_maybe_dtoh_and_synchronize",), _install_moe_streams),
    Patch("moe_host_splits", ">=0.16.1", (_MP + "transformer.moe.moe_utils.maybe_move_tensor_to_cpu",
                                          _MP + "transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu"),
          _install_moe_host_splits),
    Patch("moe_utils_without_te", ">=0.16.1", (_MP + "transformer.moe.moe_utils.RouterGatingLinearFunction",),
          _install_moe_utils_without_te),
    Patch("cuda_to_cpu_mode", ">=0.16.1", (_MP + "pipeline_parallel.schedules.forward_backward_no_pipelining",
                                           _MP + "optimizer.clip_grads.clip_grad_by_total_norm_fp32",
                                           _MP + "transformer.utils.get_default_causal_mask"),
          _install_cuda_to_cpu_mode),
)

_warned = False


def installed_version() -> str:
    """megatron-core's release, without a local part: its `__version__` appends the short commit of
    the git checkout it is imported from (0.19.2 run inside this repository says "0.19.2+0defc31")."""
    import megatron.core
    from packaging.version import Version

    return Version(str(getattr(megatron.core, "__version__", "0"))).public


def resolve(dotted: str):
    """The object a dotted name denotes: the longest importable module prefix, then attributes.
    Raises AttributeError/ImportError naming the missing piece."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module of {dotted} imports")


def patches_for(version: str) -> list[Patch]:
    """The patches that apply to megatron-core `version` (a release past the range gets every patch
    without an upper bound: its CUDA assumptions are presumed to be the newest measured ones)."""
    from packaging.specifiers import SpecifierSet

    return [p for p in PATCHES if SpecifierSet(p.versions).contains(version, prereleases=True)]


def check(version: str | None = None) -> list[str]:
    """What no longer matches for the installed megatron-core (or `version`'s patches checked against
    the installed one): a target that does not exist, or a release older than the range. Empty: all
    good."""
    from packaging.version import Version

    version = version or installed_version()
    problems = []
    if Version(version) < Version(TESTED[0]):
        problems.append(f"megatron-core {version} is older than {TESTED[0]}, the oldest release this package "
                        f"supports ({SUPPORTED}): upgrade megatron-core")
    for patch in patches_for(version):
        for target in patch.targets:
            try:
                resolve(target)
            except (ImportError, AttributeError) as exc:
                problems.append(f"{target} does not exist in megatron-core {version} ({type(exc).__name__}: {exc}): "
                                f"the CPU patch {patch.name!r} does not apply")
    return problems


def untested_note(version: str) -> str | None:
    """The one-time warning for a release CI has not run (None for a tested one)."""
    if version in TESTED:
        return None
    checked = sorted({t for p in patches_for(version) for t in p.targets})
    return (f"megatron-core {version} is not a release this package was tested on ({', '.join(TESTED)}); "
            f"the CPU patches ({', '.join(p.name for p in patches_for(version))}) were checked to still find "
            f"their targets ({', '.join(checked)}), but CUDA assumptions new in {version} are not patched: "
            "if one is hit, it fails there with torch's CUDA error ('Torch not compiled with CUDA enabled' "
            "or 'Found no NVIDIA driver')")


def verify(version: str) -> None:
    """Raise if a patch for `version` cannot apply; warn once (per process) if CI never ran it."""
    global _warned
    problems = check(version)
    if problems:
        raise RuntimeError("megatron_opcd.compat: " + "; ".join(problems))
    note = untested_note(version)
    if note and not _warned:
        _warned = True
        warnings.warn(note, stacklevel=3)


def enable() -> bool:
    """CPU mode for this process (exported as `megatron_opcd.compat.enable_cpu`): install the
    patches above for the installed megatron-core (`PATCHES`, `patches_for`): `torch.cuda`'s
    current_device, synchronize, Event, RNG functions (and, from 0.17, current_stream) replaced by
    CPU stand-ins, tensor_parallel/random.py's CUDA RNG getter/setter by the CPU generator's, and
    the `_CudaToCpuMode` TorchFunctionMode pushed on this thread's mode stack, where every later
    torch call passes through it.

    Process-wide and for the life of the process: there is no undo (`redirect_suspended` lifts
    only the mode, only for a block). An explicit opt-in, never an import side effect: entry points
    call it on a host without CUDA (the CLIs, `launcher.run_on_ranks`'s ranks, the tests' conftest,
    the demo, tools and benchmarks), and `parallel.initialize` refuses to start on such a host
    without it. Where CUDA is available it changes nothing and returns False (megatron-core's CUDA
    paths are real there), so a CLI on a GPU host never enables it. Returns True when CPU mode is
    on (now or already). Idempotent."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    version = installed_version()
    verify(version)
    for patch in patches_for(version):
        patch.install()
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
