"""Student and teacher GPTModels from megatron-core (local spec on CPU, Transformer Engine on GPU)."""

from megatron_opcd.models.builder import (
    build_model,
    build_models,
    check_same_vocabulary,
    freeze,
    transformer_config,
)

__all__ = ["build_model", "build_models", "check_same_vocabulary", "freeze", "transformer_config"]
