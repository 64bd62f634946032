"""Lazy probes for the GPU-only dependencies: Transformer Engine and NVIDIA apex.

Never imported at module import time. A partial TE install (the core wheel without cuDNN) makes
`import transformer_engine` raise RuntimeError rather than ImportError, so every probe catches
Exception and keeps the reason, which the config reports when TE or FP8 is asked for but cannot
run. PyPI's `apex` is an unrelated web package: apex counts as present only if
`apex.normalization` (NVIDIA's) imports.
"""

from __future__ import annotations

import functools

import torch


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
