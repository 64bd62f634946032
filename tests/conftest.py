"""Shared fixtures: spawning N gloo ranks, and skipping GPU-marked tests on CPU with the reason."""

from __future__ import annotations

import os

import pytest
import torch

import megatron_opcd  # noqa: F401 - installs the warning filters before megatron-core is imported

# One torch thread in the test process too: ranks and tests share 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _quiet_known_warnings():
    """pytest resets the warning filters for every test: put compat/quiet.py's back."""
    from megatron_opcd.compat import quiet

    quiet.install()


@pytest.fixture(scope="session")
def run_ranks():
    """`run_ranks(fn, world_size, *args, timeout=..., **kwargs)` -> list of per-rank results.

    `fn` must be a module-level function (it is pickled by reference into each rank). Each rank
    has the torchrun environment variables set; a hang dumps tracebacks and fails the test.
    """
    from megatron_opcd.launcher import run_on_ranks

    def _run(fn, world_size, *args, timeout=300, **kwargs):
        return run_on_ranks(fn, world_size, args, kwargs, timeout=timeout)

    return _run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (and Transformer Engine); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
