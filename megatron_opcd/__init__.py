"""megatron-opcd: On-Policy Context Distillation (Ye et al., 2026, arXiv 2602.12275) on megatron-core."""

__version__ = "0.1.0"
