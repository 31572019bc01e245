# fewstep-rl — `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch 2.13.0 installs fast; on a CUDA machine use e.g. `make install TORCH=torch==2.14.1`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,diffusers,logging,ocr
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: help install demo test test-slow lint bench smoke-cuda clean validate test-faults test-dist compare-toy2d compare-shapes bench-scale reward-parity

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install fewstep-rl (editable) with its test tools

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The default run: DI* on shapes trained on the calibrated proxy (configs/demo.yaml), then its gold against the
# teacher's own 4-step Euler + CFG chain on 2048 paired samples (same prompts, same noise).
ifndef DEMO_DIR
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
demo: install ## the default run: DI* on shapes (configs/demo.yaml, est. ~10 min on 2 cores), then gold vs. the teacher
	$(VENV)/bin/fewstep-rl fit --config configs/demo.yaml --trainer.num_threads 1 --trainer.run_dir $(DEMO_DIR)
	$(VENV)/bin/fewstep-rl eval --paired $(DEMO_DIR)/checkpoints/last.ckpt --teacher --rewards gold --n 2048 \
	  --labels "teacher 4-step Euler + CFG,demo DI* 4-step"

test: install ## run the test suite (slow tests excluded)
	$(PY) -m pytest -q

test-slow: install ## run only the slow tests
	$(PY) -m pytest -q -m slow

test-dist: install ## distributed contract: every method under ddp/fsdp2 on 2 CPU processes (toy2d + tiny sd3), resume, resharding, RTDMD's fold
	$(PY) -m pytest -q -m dist tests/test_dist_contract.py tests/test_multinode.py tests/test_fsdp_fold.py

test-faults: install ## fault injection: kill -9/SIGINT/SIGTERM + resume bit-exact, bad checkpoints/rewards/inputs (< 10 min)
	$(PY) -m pytest -q -m faults tests/test_faults.py

# The reference reward packages (open_clip_torch, hpsv2, image-reward, OpenAI clip) need torchvision, which does not
# import beside the CPU torch 2.13.0 above: they get their own interpreter (.venv-parity, torch 2.14.1 + torchvision
# 0.29.1 from this machine's disk: 6.0 GB, ~4 min). The test writes checkpoints, inputs and our scores to files; the reference
# interpreter scores them with the packages' own code (tests/reward_parity_ref.py).
PARITY_VENV ?= .venv-parity
$(PARITY_VENV)/packages: tests/reward_parity_env.sh
	tests/reward_parity_env.sh $(PARITY_VENV)

reward-parity: install $(PARITY_VENV)/packages ## slow: HPSv2/2.1, ImageReward, aesthetic scores vs the reference packages
	PARITY_PYTHON=$(PARITY_VENV)/bin/python PARITY_PACKAGES=$$(cat $(PARITY_VENV)/packages) \
	  $(PY) -m pytest -q -s -m parity tests/test_reward_parity.py

lint: install ## ruff + import-linter layer contracts
	$(VENV)/bin/ruff check src methods rewards tests benchmarks
	@# import-linter reads the package from disk; the editable install maps methods/ and rewards/ into
	@# fewstep_rl only at import time, so check a real (wheel-layout) install in a scratch directory.
	rm -rf build/lint && $(PIP) install -q --no-deps --no-build-isolation --target build/lint . >/dev/null
	cd build/lint && PYTHONPATH=. ../../$(VENV)/bin/lint-imports --config ../../pyproject.toml

VALIDATE_JOBS ?= 2
VALIDATE_METHODS ?= crd,didr,rtdmd,tdm_r1,flow_grpo,nft,refl,di_star
validate: install ## slow: every reward-driven method on 10 random multimodal toy2d worlds (runs/validate/<method>)
	OMP_NUM_THREADS=1 $(VENV)/bin/fewstep-rl validate --method $(VALIDATE_METHODS) --worlds 10 --seed 0 \
	  --jobs $(VALIDATE_JOBS) --out runs/validate

bench: install ## per-method step time vs. its own network passes, and peak memory
	$(PY) benchmarks/bench_methods.py

bench-scale: install ## every method at SD3.5-M size on CUDA (random bf16 weights, MFU, peak memory; BENCH_SCALE_ARGS='--world flux|flux2|zimage|qwen_image' for the other families); tiny width on CPU
	$(PY) benchmarks/scale.py $(BENCH_SCALE_ARGS)

smoke-cuda: install ## every method, 4 bf16-mixed iterations on the default world, on CUDA (needs a GPU)
	@mkdir -p runs/smoke-cuda; for m in $$($(PY) -c "from fewstep_rl import registry; print(' '.join(registry.names('methods')))"); do \
	  $(VENV)/bin/fewstep-rl fit --method $$m --trainer.accelerator cuda --trainer.precision bf16-mixed \
	    --trainer.max_steps 4 --trainer.eval_every 2 --trainer.eval_samples 16 --trainer.progress_bar false \
	    --trainer.run_dir runs/smoke-cuda/$$m > runs/smoke-cuda/$$m.log 2>&1 && echo "$$m: ok" \
	    || { echo "$$m: FAILED (runs/smoke-cuda/$$m.log)"; exit 1; }; done

compare-toy2d: install ## every reward-driven method side by side on toy2d (report in runs/compare-toy2d, < 10 min)
	$(VENV)/bin/fewstep-rl compare configs/compare/toy2d.yaml --jobs 2

compare-shapes: install ## seven methods on shapes, proxy reward, gold judge, equal wall budget (< 90 min on 2 cores)
	$(VENV)/bin/fewstep-rl compare configs/compare/shapes.yaml --jobs 2

clean: ## remove the virtualenvs and run outputs
	rm -rf $(VENV) $(PARITY_VENV) runs .pytest_cache
