# fewstep-rl — `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch 2.13.0 installs fast; on a CUDA machine use e.g. `make install TORCH=torch==2.14.1`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,diffusers,ocr
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: help install demo test test-slow lint bench smoke-cuda clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install fewstep-rl (editable) with its test tools

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: install ## train the default method on the default world (DMD2 on shapes, < 15 min on 2 cores)
	$(VENV)/bin/fewstep-rl fit --method dmd2

test: install ## run the test suite (slow tests excluded)
	$(PY) -m pytest -q

test-slow: install ## run only the slow tests
	$(PY) -m pytest -q -m slow

lint: install ## ruff + import-linter layer contracts
	$(VENV)/bin/ruff check src methods rewards tests benchmarks
	@# import-linter reads the package from disk; the editable install maps methods/ and rewards/ into
	@# fewstep_rl only at import time, so check a real (wheel-layout) install in a scratch directory.
	rm -rf build/lint && $(PIP) install -q --no-deps --no-build-isolation --target build/lint . >/dev/null
	cd build/lint && PYTHONPATH=. ../../$(VENV)/bin/lint-imports --config ../../pyproject.toml

bench: install ## per-method step time vs. its own network passes, and peak memory
	$(PY) benchmarks/bench_methods.py

smoke-cuda: install ## every method, 4 bf16-mixed iterations on the default world, on CUDA (needs a GPU)
	@mkdir -p runs/smoke-cuda; for m in $$($(PY) -c "from fewstep_rl import registry; print(' '.join(registry.names('methods')))"); do \
	  $(VENV)/bin/fewstep-rl fit --method $$m --trainer.accelerator cuda --trainer.precision bf16-mixed \
	    --trainer.max_steps 4 --trainer.eval_every 2 --trainer.eval_samples 16 --trainer.progress_bar false \
	    --trainer.run_dir runs/smoke-cuda/$$m > runs/smoke-cuda/$$m.log 2>&1 && echo "$$m: ok" \
	    || { echo "$$m: FAILED (runs/smoke-cuda/$$m.log)"; exit 1; }; done

clean: ## remove the virtualenv and run outputs
	rm -rf $(VENV) runs .pytest_cache
