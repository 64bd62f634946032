"""The small, documented shims between megatron_opcd and its environment, and nothing else.

- `cpu`: megatron-core's CUDA assumptions patched away where CUDA is absent (dev boxes, CI).
- `optional`: lazy probes for Transformer Engine and apex, the GPU-only dependencies.
"""

from megatron_opcd.compat import optional
from megatron_opcd.compat.cpu import apply as apply_cpu_patches
from megatron_opcd.compat.cpu import check as check_cpu_patches

__all__ = ["apply_cpu_patches", "check_cpu_patches", "optional"]
