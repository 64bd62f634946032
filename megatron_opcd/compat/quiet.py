"""Warnings megatron-core and torch print on every CPU process that say nothing actionable here.

Each is replaced by one explicit line: `megatron_opcd.parallel.initialize()` logs which
implementations run (local spec, torch norms and optimizer without TE/apex) once per job.
"""

import warnings

_KNOWN = [
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS"),
    (FutureWarning, r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|_reduce_scatter_base)` is deprecated"),
]


def install() -> None:
    for category, message in _KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)


install()
