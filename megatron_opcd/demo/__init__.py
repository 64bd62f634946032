"""`make demo`: the embedded default demo (python -m megatron_opcd.demo)."""
