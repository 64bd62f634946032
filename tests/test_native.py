"""How the C kernels (megatron_opcd/native.py) are found once built: without a second ninja run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from megatron_opcd import native

STATUS = "from megatron_opcd import native; print(native.native_status())"


def test_a_built_kernel_loads_without_running_ninja_again(tmp_path, monkeypatch):
    """A process finds the library a previous one built (stamped) and loads it without
    cpp_extension's ninja check: a ninja that fails, first on PATH, is never run. (Before, every
    process ran ninja, and the other of two ninja releases, the system's and the venv's, rebuilt
    the kernels: ~13 s with every rank waiting on the flock, at each switch during `make test`.) A
    stale stamp takes the full path again, i.e. the ninja on PATH."""
    ok, why = native.native_status()  # built (or found) by this user
    if not ok:
        pytest.skip(f"CPU kernels unavailable here: {why}")
    built = native._build_folder()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    env = {**os.environ, "OPCD_CPU_KERNEL": "1", "OPCD_CACHE_DIR": str(cache), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    monkeypatch.setenv("OPCD_CACHE_DIR", str(cache))
    folder = str(native._build_folder())  # the same build in a folder of this test
    assert os.path.dirname(folder) == str(cache) and os.path.basename(folder) == built.name
    for name in ("opcd_kernels.so", "opcd_kernels.built"):
        shutil.copy2(built / name, os.path.join(folder, name))  # copy2: the stamp names the file's mtime
    called = tmp_path / "ninja-was-run"
    (tmp_path / "ninja").write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
    (tmp_path / "ninja").chmod(0o755)

    out = subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(True, 'ok')" in out.stdout and not called.exists(), (out.stdout, out.stderr)

    with open(os.path.join(folder, "opcd_kernels.built"), "a") as f:
        f.write(" ")  # stale: the full cpp_extension path, which runs the failing ninja
    out = subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert called.exists() and "did not build or load" in out.stdout, out.stdout
