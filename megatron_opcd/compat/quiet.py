"""Warnings megatron-core and torch print on every CPU process that say nothing actionable here.

Each is replaced by one explicit line: `megatron_opcd.parallel.initialize()` logs which
implementations run (local spec, torch norms and optimizer without TE/apex) and which megatron-core
release, once per job.

megatron-core 0.19 logs "GPTModel IS DEPRECATED ... use HybridModel" at every GPTModel built (the
student, the teacher, every conversion). This package builds GPTModel on purpose (the plan for
HybridModel: docs/compatibility.md); the line would tell a user to change code that is not theirs,
so it is filtered here, by its logger and its text only.
"""

import logging
import warnings

_KNOWN = [
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS"),
    (FutureWarning, r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|_reduce_scatter_base)` is deprecated"),
    # megatron-core 0.19 (hyper_comm_grid.py) at import: absl-py is an optional logging backend.
    (UserWarning, r"absl.logging is not installed"),
    # megatron-core 0.19 at import of its models package; this package does not use MIMO models.
    (UserWarning, r"MimoModelConfig is experimental"),
]

# (logger, text) of megatron-core log records dropped (see the module docstring).
_KNOWN_LOGS = [
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    # A CUDA build of torch on a machine without a GPU (the Python 3.12 CI environment), at import.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
]


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    for category, message in _KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in _KNOWN_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))


install()
