"""megatron-opcd: On-Policy Context Distillation (Ye et al., 2026, arXiv 2602.12275) on megatron-core."""

# Before megatron-core is imported anywhere: silence its warnings that are noise on CPU machines
# (parallel.initialize prints one explicit line about the implementations in use instead).
from megatron_opcd.compat import quiet as _quiet  # noqa: F401
from megatron_opcd.compat import lazy_jit as _lazy_jit  # noqa: E402 - before megatron-core too

_lazy_jit.install()  # megatron's torch.compile decorations at first call (compat/lazy_jit.py)

__version__ = "0.1.0"
