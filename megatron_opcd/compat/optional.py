"""Lazy probes for the GPU-only dependencies: Transformer Engine and NVIDIA apex.

Never imported at module import time. A partial TE install (the core wheel without cuDNN) makes
`import transformer_engine` raise RuntimeError rather than ImportError, so every probe catches
Exception and keeps the reason, which `check_runtime` (below) reports when a model config asks
for TE or FP8 and it cannot run. PyPI's `apex` is an unrelated web package: apex counts as present
only if `apex.normalization` (NVIDIA's) imports.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from megatron_opcd.errors import ConfigError

if TYPE_CHECKING:
    from megatron_opcd.config import ModelConfig


@functools.lru_cache(maxsize=None)
def transformer_engine_status() -> tuple[bool, str]:
    """(usable, reason): TE imports and CUDA is present."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available (Transformer Engine layers run on NVIDIA GPUs only)"
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - TE raises RuntimeError on partial installs
        return False, f"transformer_engine does not import ({type(exc).__name__}: {exc}); install the `gpu` extra"
    return True, "ok"


@functools.lru_cache(maxsize=None)
def fp8_status() -> tuple[bool, str]:
    """(usable, reason): FP8 needs TE and a GPU of compute capability >= 8.9 (Ada/Hopper)."""
    ok, why = transformer_engine_status()
    if not ok:
        return False, why
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"FP8 needs compute capability >= 8.9 (Ada/Hopper), this GPU has {major}.{minor}"
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support

        supported, reason = check_fp8_support()
        if not supported:
            return False, f"Transformer Engine reports no FP8 support: {reason}"
    except Exception:  # noqa: BLE001 - older TE: the capability check above is what it would do
        pass
    return True, "ok"


@functools.lru_cache(maxsize=None)
def apex_status() -> tuple[bool, str]:
    """(usable, reason): NVIDIA apex (not PyPI's `apex`) imports."""
    try:
        import apex.normalization  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"NVIDIA apex is not installed ({type(exc).__name__}); megatron-core uses its torch fallbacks"
    return True, "ok"


def check_runtime(model: ModelConfig, role: str = "model") -> None:
    """Reject options this machine cannot run (TE/FP8 without a GPU), with the reason.

    Here and not in config.py: the config schema sits below compat (docs/architecture.md) and
    asks nothing of the machine; the model builder calls this before anything is built."""
    if model.transformer_impl == "transformer_engine":
        ok, why = transformer_engine_status()
        if not ok:
            raise ConfigError(
                f"{role}.transformer_impl=transformer_engine cannot run here: {why}; "
                f"set {role}.transformer_impl=local (and {role}.fp8=null) on this machine"
            )
    if model.fp8 is not None:
        ok, why = fp8_status()
        if not ok:
            raise ConfigError(f"{role}.fp8={model.fp8!r} cannot run here: {why}; set {role}.fp8=null")
    if model.params_dtype != "fp32":
        if not torch.cuda.is_available() and model.params_dtype == "fp16":
            raise ConfigError(f"{role}.params_dtype=fp16 is not supported on CPU; use fp32 or bf16")
