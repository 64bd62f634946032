"""megatron-core's `jit_fuser` (`torch.compile`) applied at a fused function's first call, not at import.

`megatron/core/jit.py` sets `jit_fuser = torch.compile` (torch >= 2.2), and a dozen fusion modules
decorate their functions with it while `import megatron.core` runs. torch.compile compiles at the
first call anyway; what it does at decoration is look up its backend, which imports torch._dynamo
and torch._inductor: ~3 of the ~5 CPU-s that importing megatron-core costs each process (every
torchrun rank, every CLI), measured on torch 2.13 with megatron-core 0.16.1 and 0.19.2. Deferring
the `torch.compile(fn)` call to the first call gives the same compiled function then, and a process
that never calls a fused function (a CPU run with the local spec, a conversion) never pays for it.

`install()` (run by `import megatron_opcd`, before megatron-core is imported anywhere) adds an
import hook that, once `megatron.core.jit` has run, replaces its `jit_fuser` by `lazy_compile` if it
is `torch.compile` (megatron's own `noop_decorator` or a user's `disable_jit_fuser()` stay as they
are). If megatron-core was imported first, nothing changes.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

_MODULE = "megatron.core.jit"


def lazy_compile(fn=None, **options):
    """`torch.compile(fn, **options)`, called at `fn`'s first call (decorator, with or without options)."""
    if fn is None:
        return functools.partial(lazy_compile, **options)
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return call


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = lazy_compile


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """The import hook (idempotent); a no-op once megatron.core.jit is imported."""
    if _MODULE in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
