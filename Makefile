# Quick start: `make demo` (train, sample, show) and `make test` (CPU test suite).
VENV := build/venv
PY := $(VENV)/bin/python
export TRITON_CACHE_DIR := $(CURDIR)/build/triton-cache
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/build/inductor-cache
PYTEST_ARGS ?=

.PHONY: setup test demo lint bench device-check clean

$(VENV)/.stamp: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $@

setup: $(VENV)/.stamp

# Without CUDA, Triton kernels run through the interpreter; it must be set before
# triton is imported. pytest's exit code 5 (nothing collected) is a failure.
test: setup
	@if ! $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  export TRITON_INTERPRET=1; fi; \
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: setup
	$(PY) -m sddit demo $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench.kernels

device-check:
	bash bench/device_check.sh

clean:
	rm -rf build device-out
