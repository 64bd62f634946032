# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs
# what it needs when absent, so a second run starts at once.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)
# One torch thread per process: on 2 shared cores oversubscription is 15x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test install clean

$(STAMP):
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# The CPU wheel first: nothing after it may pull a CUDA build of torch.
	$(VPY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check -e ".[test]"
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m megatron_opcd.demo

# pytest exits 5 when it collected no tests: that is a failure here.
test: $(STAMP)
	$(VPY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs
