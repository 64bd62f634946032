"""Shared fixtures: spawning N gloo ranks, and skipping GPU-marked tests on CPU with the reason."""

from __future__ import annotations

import os

import pytest
import torch

import megatron_opcd  # noqa: F401 - installs the warning filters before megatron-core is imported
from megatron_opcd.compat import enable_cpu

# One torch thread in the test process too: ranks and tests share 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# CPU mode for the tests that build models in this process, as every entry point opts in on a
# host without CUDA (a no-op with CUDA; the launcher's ranks opt in themselves).
enable_cpu()


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


# The modules that exercise megatron-core (models, layouts, losses, generation, training,
# conversion, checkpoints, the adapter's contract): marked `mcore`, the part of the suite that
# `make test-312` runs again on Python 3.12 with the newest supported megatron-core. The rest (config
# parsing, data, graders, docs, shell scripts, games, the demo) does not depend on megatron-core's
# version and runs once, in `make test-311`. A new module that builds or runs a megatron model
# belongs here (tests/test_mcore_contract.py checks these files exist).
MCORE_MODULES = (
    "test_mcore_contract.py",
    "test_models.py",
    "test_layouts.py",
    "test_moe.py",
    "test_moe_train.py",
    "test_losses.py",
    "test_diagnostics.py",
    "test_teacher_ema.py",
    "test_teacher_layout.py",
    "test_generation.py",
    "test_train.py",
    "test_lazy_jit.py",
    "test_convert.py",
    "reliability/test_model_errors.py",
    "reliability/test_numerics.py",
)

# Tests of those modules that never reach megatron-core (the C decode kernel, pure sampling
# functions, a benchmark script's smoke run): not marked, they run once, in make test-311.
MCORE_INDEPENDENT = (
    "test_losses.py::test_benchmark_quick_mode_runs",
    "test_generation.py::test_cpu_decode_kernel_matches_float64",
    "test_generation.py::test_cpu_decode_kernel_applies_only_where_it_is_right",
    "test_generation.py::test_cpu_decode_kernel_off_says_why",
    "test_generation.py::test_cpu_decode_kernel_ops_check_their_arguments",
    "test_generation.py::test_cpu_decode_kernel_is_never_loaded_from_a_folder_others_can_write",
    "test_generation.py::test_top_k_and_top_p_filters",
    "test_generation.py::test_draw_categorical_matches_the_distribution",
    "test_generation.py::test_sampling_params_validation",
    "test_generation.py::test_stop_strings_are_checked_on_the_tail_only",
)


# `make test` runs the suite on 2 pytest-xdist workers (`-n 2 --dist loadscope
# --no-loadscope-reorder`): most tests wait on subprocesses, sleeps and gloo, so one worker left a
# core idle half the time. A module's tests stay on one worker (its module-scoped fixtures, e.g.
# test_preempt's runs or test_user_path's walk, are built once), except in SPREAD_MODULES, whose
# long independent cases are scheduled one by one (tests/test_rehearsal.py: one per example; its
# shared world is built once under a lock). The longest modules are collected first (LONG_FIRST,
# by measured wall time), so that no long one starts last and alone. (Not `--dist loadgroup`: with
# pytest 9.2 an item's id lives in `_id`, and xdist 3.8 marks a group by rewriting `_nodeid`, so
# the groups never form: seen as one module's tests on both workers.)
SPREAD_MODULES = ("test_rehearsal.py",)
LONG_FIRST = ("test_user_path.py", "test_rehearsal.py", "reliability/test_preempt.py", "reliability/test_faults.py",
              "test_experience.py", "test_convert.py", "test_synthetic.py", "test_train.py", "test_cluster.py")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown (and unused) where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope, grouped by module (not by class), SPREAD_MODULES test by test."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if os.path.basename(module) in SPREAD_MODULES else module

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    tests_dir = os.path.dirname(__file__)
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), tests_dir), len(rank)))  # stable
    mcore = {os.path.join(tests_dir, name) for name in MCORE_MODULES}
    for item in items:
        if str(item.path) in mcore:
            rel = os.path.relpath(str(item.path), tests_dir) + "::" + item.name.split("[")[0]
            if rel not in MCORE_INDEPENDENT:
                item.add_marker(pytest.mark.mcore)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (and Transformer Engine); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


