# The two commands of the README: `make train` and `make test`. Each sets itself up on a fresh
# machine: a .venv with torch==2.13.0 installed first (the local CPU wheel), then the project.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtc-installed
ARGS ?=

.PHONY: setup setup-lmms train test test-fast eval mlflow bench clean-runs report study-fig1 study-stf study-stages study-video study-zoo study-zoo-trained

setup: $(STAMP)

# Every install after torch's is constrained to that torch: no extra may swap the CPU build for
# another (lmms-eval's own requirements would pull a CUDA torch 2.14).
TORCH := torch==2.13.0
LMMS_EVAL := lmms-eval==0.7.3
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
	$(PY) -m pip install -q -c <(echo $(TORCH)) -e '.[dev,loggers,lmms]'
	$(PY) -m pip install -q -c <(echo $(TORCH)) --no-deps '$(LMMS_EVAL)'
	touch $(STAMP)

## The lmms-eval plugin's packages into an existing environment (what setup installs for it).
setup-lmms:
	$(PY) -m pip install -q -c <(echo $(TORCH)) -e '.[lmms]'
	$(PY) -m pip install -q -c <(echo $(TORCH)) --no-deps '$(LMMS_EVAL)'

## Train the tiny model on the synthetic set (generated on first use), evaluate, log to MLflow.
train: setup
	$(PY) train.py $(ARGS)

## The package layers (import-linter, pyproject.toml), then the test suite (CPU only; GPU tests are
## skipped without CUDA).
test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(ARGS)

## Evaluate a checkpoint: make eval ARGS="ckpt_path=outputs/runs/.../checkpoints/last.ckpt"
eval: setup
	$(PY) eval.py $(ARGS)

## Report from MLflow: make report ARGS="--experiment train [--parent RUN_ID] [--out DIR]"
report: setup
	$(PY) -m vtc.runs.report $(ARGS)

## Study llavolta_fig1 (experiments/llavolta_fig1/README.md): train 3 seeds uncompressed, eval with
## test-time pooling at strides 1,2,4,8, report: make study-fig1 ARGS="[--seeds 0,1] [-- overrides]"
study-fig1: setup
	$(PY) -m vtc.runs.study llavolta_fig1 $(ARGS)

## Study stf_vs_pool (experiments/stf_vs_pool/README.md): none / pool / STF / STF+MBTF trained
## at 16 of 64 tokens, 3 seeds each, report: make study-stf ARGS="[--seeds 0,1] [-- overrides]"
study-stf: setup
	$(PY) -m vtc.runs.study stf_vs_pool $(ARGS)

## Study llavolta_stages (experiments/llavolta_stages/README.md): none / LLaVolta 4-stage /
## constant heavy pooling, 3 seeds each, report: make study-stages ARGS="[--seeds 0,1] [-- overrides]"
study-stages: setup
	$(PY) -m vtc.runs.study llavolta_stages $(ARGS)

## Study llavolta_video (experiments/llavolta_video/README.md): on the synthetic video benchmark, none /
## LLaVolta 4-stage / constant heavy pooling / one frame / frame average, 3 seeds each, report:
## make study-video ARGS="[--seeds 0,1] [-- overrides]"
study-video: setup
	$(PY) -m vtc.runs.study llavolta_video $(ARGS)

## Study zoo_ranking, part 1 (experiments/zoo_ranking/README.md): the uncompressed model, 3 seeds, and every
## parameter-free method applied at test time at 16 and 4 of its 64 tokens: make study-zoo ARGS="[--seeds 0]"
study-zoo: setup
	$(PY) -m vtc.runs.study zoo_ranking $(ARGS)

## Study zoo_ranking, part 2: part 1's 3 models exported, then each method fine-tuned 200 steps at 16
## and 4 tokens with its compression on (23 arms x 3 seeds, ~2 hours): make study-zoo-trained ARGS="[--seeds 0]"
ZOO = outputs/studies/zoo_ranking
study-zoo-trained: setup
	for s in 0 1 2; do test -d $(ZOO)/export/seed_$$s || $(PY) -m vtc.eval.export \
	  --ckpt $(ZOO)/train/seed_$$s/checkpoints/last.ckpt --out $(ZOO)/export/seed_$$s || exit 1; done
	$(PY) -m vtc.runs.study zoo_ranking_trained $(ARGS)

## The MLflow dashboard on 127.0.0.1 only, of the store the runs log to: $MLFLOW_TRACKING_URI when
## set, else the repo's sqlite file. Run artifacts lie beside a sqlite store (mlartifacts/, set by
## vtc.runs.tracking when an experiment is created), where the dashboard reads them.
MLFLOW_STORE = $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
MLFLOW_DB = $(patsubst sqlite:///%,%,$(filter sqlite:///%,$(MLFLOW_STORE)))
mlflow: setup
	$(PY) -m mlflow ui --backend-store-uri '$(MLFLOW_STORE)' --host 127.0.0.1 --port 5000 \
		$(if $(MLFLOW_DB),--artifacts-destination '$(dir $(MLFLOW_DB))mlartifacts')

## The speed benchmarks (CPU; tables in experiments/bench/): make bench ARGS=--quick for a smoke test
bench: setup
	$(PY) -m vtc.bench.compressors $(ARGS)
	$(PY) -m vtc.bench.curriculum $(ARGS)

## Runs logged to the repo's default store; mlruns/ is where MLflow put artifacts of experiments
## created before vtc set their location.
clean-runs:
	rm -rf outputs multirun mlflow.db mlartifacts mlruns
