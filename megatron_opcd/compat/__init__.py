"""The small, documented shims between megatron_opcd and its environment, and nothing else.

- `cpu`: megatron-core's CUDA assumptions patched away where CUDA is absent (dev boxes, CI), once an
  entry point opts in with `enable_cpu()`.
- `quiet`: filters for warnings that say nothing actionable on these machines.
- `optional`: lazy probes for Transformer Engine and apex, the GPU-only dependencies.
- `lazy_jit`: megatron-core's `jit_fuser` (torch.compile) applied at first call, not at import.
"""

from megatron_opcd.compat import optional, quiet  # noqa: F401 - quiet installs its filters
from megatron_opcd.compat.cpu import check as check_cpu_patches
from megatron_opcd.compat.cpu import enable as enable_cpu
from megatron_opcd.compat.cpu import redirect_suspended

__all__ = ["check_cpu_patches", "enable_cpu", "optional", "redirect_suspended"]
