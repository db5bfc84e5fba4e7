# Two entry points: `make test` and `make demo`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,llm,diffusion
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: test demo install toy-models bench-smc bench-diffusion clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is installed first, pinned, so that nothing else ever pulls a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/ppl-scaling demo --out demo_output

toy-models: $(STAMP)
	$(PY) scripts/train_toy_lm.py
	$(PY) scripts/train_toy_diffusion.py

# The SMC core benchmark compares against `particles`, which pins numpy < 2: its own venv.
benchmarks/.venv-particles:
	$(PYTHON) -m venv benchmarks/.venv-particles
	benchmarks/.venv-particles/bin/pip install -q -r benchmarks/requirements-particles.txt

bench-smc: $(STAMP) benchmarks/.venv-particles
	$(PY) benchmarks/smc_core.py

bench-diffusion: $(STAMP)
	$(PY) benchmarks/diffusion_overhead.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
