"""Two CPU kernels, the decode step's matmuls and the loss's top-k selection, as torch custom ops.

The source is megatron_opcd/csrc/opcd_kernels.cpp; it registers `torch.ops.opcd.linear_rows` and
`torch.ops.opcd.topk_rows`, which check device, dtype, shape, strides and autograd and fail with a
message naming the argument.

`linear_rows`: a few rows of activations times a weight matrix. At 8 rows (a decode step of 8
sequences) MKL's sgemm, whichever layout and packing it is given, streams a 28M-parameter
model's weights at ~6.5 GB/s on one core, a third of what the core reads (docs/generation.md).
`linear_rows` computes `y = x @ w.T` for `x` `[M <= 8, K]` and the weight in its own `[N, K]`
layout: each weight row is read once, contiguously, and dotted with the M activation rows (AVX2
FMA, fp32 accumulation in 8 lanes, then a horizontal sum). Used for 2 to 8 rows (one row is a
matrix-vector product MKL streams as fast). Errors against float64 no larger than MKL's.

`topk_rows`: the k largest entries of each row, ties at the k-th value to the lower columns (the
rule `losses.functional.local_topk` implements on top of `torch.topk`), as a set in column order. A
radix select on order-preserving 32-bit keys of the floats (the top 11 bits counted in four
interleaved histograms, then the next 11 and the last 10 among the candidates of the chosen
bucket), then one collecting pass.

What they buy, measured against the torch path they replace (one thread, same run; the numbers
and the decision to keep them are in docs/generation.md, "The CPU kernels: kept, measured").

The ops are built on first use with `torch.utils.cpp_extension.load` (ninja, the C++ compiler
`$CXX` or `c++`, `-O3 -mavx2 -mfma -Wall -Wextra -Werror`: a warning is a failed build, reported
below, never a silent one), about 10 s once per machine and torch release, into a folder of this
user (`$OPCD_CACHE_DIR`, else `$XDG_CACHE_HOME/megatron_opcd`, else `~/.cache/megatron_opcd`; a
temporary folder if none is writable; a folder not owned by this user or writable by others is
passed over: the library runs as us). cpp_extension rebuilds when the source or the flags change.
A later process loads the library it built directly, through a stamp beside it (no ninja run).
Ranks that build at once take turns on an `flock` (released by the kernel if a rank dies, unlike
cpp_extension's own lock file, which a killed build leaves behind). `native_status()` says whether
the ops can run and why not: no AVX2/FMA, no ninja, a failed build (no compiler, a warning), or
`OPCD_CPU_KERNEL=0`. Callers fall back to torch and `announce_fallback` says so once per process.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

MAX_ROWS = 8
"""Rows per call: the kernel keeps one 8-lane accumulator per row in AVX2's 16 registers."""
MIN_ROWS = 2
"""One row (batch 1) is a matrix-vector product that MKL streams as fast (docs/generation.md):
it keeps its `[in, out]` copies there (models.kernels.ForwardOnlyLinear)."""

SOURCE = Path(__file__).parent / "csrc" / "opcd_kernels.cpp"
FLAGS = ["-O3", "-mavx2", "-mfma", "-Wall", "-Wextra", "-Werror"]


def _cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("OPCD_CACHE_DIR"):
        dirs.append(Path(os.environ["OPCD_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    dirs += [Path(base) / "megatron_opcd", Path(tempfile.gettempdir()) / f"megatron_opcd-{os.getuid()}"]
    return dirs


def _build_folder() -> Path:
    """This user's folder for the build, one per Python and torch release (the library links
    against torch's C++ ABI) and per source file, its text and the flags: cpp_extension's ninja file
    names the source by path, so two checkouts (or two versions) sharing one folder would each
    rebuild on every other process's start. Also per torch installation (its folder and full
    version): the ninja file names torch's headers by path, so two environments of one release
    (`.venv` and `.venv-nemo`) took turns rebuilding it too."""
    key = [str(SOURCE), SOURCE.read_text(), *FLAGS, os.path.dirname(torch.__file__), torch.__version__]
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}-{digest}"
    errors = []
    for folder in _cache_dirs():
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = folder.stat()
            if info.st_uid != os.getuid() or info.st_mode & 0o022:  # a library loaded from here runs as us
                raise OSError("not owned by this user, or writable by others")
            build = folder / f"opcd_kernels-{tag}"
            build.mkdir(mode=0o700, exist_ok=True)
            return build
        except OSError as exc:  # not writable: try the next folder
            errors.append(f"{folder}: {exc}")
    raise RuntimeError("no writable cache folder (" + "; ".join(errors) + ")")


def _ninja_dir() -> str | None:
    """The folder of a ninja executable: on PATH, else beside this Python (the `ninja` package's
    script in a virtual environment that was not activated), else the `ninja` package's own."""
    found = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    if found:
        return str(Path(found).parent)
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


@contextmanager
def _exclusive(build: Path, ninja_dir: str):
    """One process at a time builds in `build`, with ninja on PATH for cpp_extension (it runs
    `ninja` by name) for the duration. Inside the flock no other live process is building, so a
    `lock` file of cpp_extension's there was left by a killed build: removed, else every later
    build would wait on it forever."""
    with open(build / "opcd.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = ninja_dir + os.pathsep + path
        try:
            yield
        finally:
            os.environ["PATH"] = path


def _stamp(library: Path, compiler: str) -> str:
    info = library.stat()
    return json.dumps({"cxx": compiler, "size": info.st_size, "mtime_ns": info.st_mtime_ns})


def _load_built(build: Path, compiler: str) -> bool:
    """Load the library a previous process of this user built here, without cpp_extension: its
    ninja check costs a few tenths of a second per process, and two ninja releases (the system's,
    the `ninja` package's in a virtual environment) disagree on each other's build log, so a check
    by the other one rebuilt it (~13 s, every rank waiting on the flock; seen in `make test`, whose
    processes have one or the other first on PATH). The folder's name already keys the source
    text, flags, Python and torch; the stamp adds the compiler and the library file itself (a
    rebuild changes its size or mtime, and a missing or stale stamp takes the full path)."""
    library, stamp = build / "opcd_kernels.so", build / "opcd_kernels.built"
    try:
        if stamp.read_text() != _stamp(library, compiler):
            return False
    except OSError:  # never built here, or not by this code
        return False
    torch.ops.load_library(str(library))
    return True


def _mark_built(build: Path, compiler: str) -> None:
    """After a build (or ninja's no-op check) that loaded: the stamp `_load_built` trusts, atomically."""
    tmp = build / f"opcd_kernels.built.{os.getpid()}"
    tmp.write_text(_stamp(build / "opcd_kernels.so", compiler))
    os.replace(tmp, build / "opcd_kernels.built")


@functools.lru_cache(maxsize=None)
def _library() -> tuple[bool, str | None]:
    """(True, None) once the ops are registered in this process, or (False, why they cannot run)."""
    if os.environ.get("OPCD_CPU_KERNEL", "1") == "0":
        return False, "disabled by OPCD_CPU_KERNEL=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return False, f"this CPU has no AVX2/FMA (torch reports {capability})"
    ninja_dir = _ninja_dir()
    if ninja_dir is None:
        return False, "ninja not found (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")  # what cpp_extension runs
    try:
        build = _build_folder()
        with _exclusive(build, ninja_dir):
            if not _load_built(build, compiler):
                from torch.utils.cpp_extension import load

                load(name="opcd_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=str(build),
                     is_python_module=False, verbose=False)
                _mark_built(build, compiler)
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: fall back, with the reason
        return False, f"the kernels did not build or load with {compiler} ({type(exc).__name__}: {str(exc)[-300:]})"
    _register_fake()
    return True, None


def _register_fake() -> None:
    """Shapes of the ops' outputs for torch.compile (the compiled decode step traces `linear_rows`
    with fake tensors and calls the kernel itself at run time)."""
    try:
        torch.library.register_fake("opcd::linear_rows")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    except RuntimeError:  # registered already (a second load in this process)
        pass


def native_status() -> tuple[bool, str]:
    """(usable, reason): whether the kernels (`linear_rows`, `topk_rows`) can run in this process."""
    ok, why = _library()
    return ok, why or "ok"


def supports(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_rows(x2d, weight)` applies: CPU fp32, MIN_ROWS to MAX_ROWS rows, rows with unit
    stride, a contiguous `[N, K]` weight, and one torch thread (the kernel runs on one core; with
    more threads MKL's parallel sgemm is the better choice)."""
    return (  # the row count first: it alone turns away prefill and batch-1 steps
        x2d.dim() == 2 and MIN_ROWS <= x2d.shape[0] <= MAX_ROWS and x2d.device.type == "cpu"
        and weight.device.type == "cpu" and x2d.dtype == torch.float32 and weight.dtype == torch.float32
        and x2d.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] == x2d.shape[1]
        and not torch.is_grad_enabled()
        # traced by torch.compile: the compiled decode step is built with one thread only
        and (torch.compiler.is_compiling() or torch.get_num_threads() == 1)
    )


def _loaded() -> None:
    ok, why = _library()
    if not ok:
        raise RuntimeError(f"the CPU kernels are unavailable: {why}")


def linear_rows(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x2d @ weight.T`, `[M, K] x [N, K] -> [M, N]` fp32 (check `supports` first)."""
    if not torch.compiler.is_compiling():  # traced: the op was loaded by the eager prefill before
        _loaded()
    return torch.ops.opcd.linear_rows(x2d, weight)


def topk_supports(x: torch.Tensor, k: int) -> bool:
    """Whether `topk_rows(x, k)` applies: a CPU fp32 `[c, n]` with unit-stride rows, 1 <= k <= n,
    no autograd, one torch thread (torch.topk spreads rows over threads), and the kernels built."""
    return (
        x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(1) == 1
        and 1 <= k <= x.shape[1] and not (torch.is_grad_enabled() and x.requires_grad)
        and torch.get_num_threads() == 1 and native_status()[0]
    )


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values `[c, k]` fp32, columns `[c, k]` int64) of the k largest entries of each row, ties at
    the k-th value to the lowest columns, in ascending column order (check `topk_supports`)."""
    _loaded()
    return torch.ops.opcd.topk_rows(x, k)


@functools.lru_cache(maxsize=None)
def announce_fallback() -> None:
    """Say once per process (rank 0) that the kernels cannot run, and why: decoding then runs on
    torch matmuls and the loss's top-k on torch.topk."""
    ok, why = native_status()
    if ok or os.environ.get("OPCD_QUIET") == "1":
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(f"[megatron-opcd] CPU kernels not used ({why}); decoding uses torch matmuls and the loss torch.topk",
          file=sys.stderr, flush=True)
