# Every target creates .venv from requirements.txt on first use (a fresh clone needs nothing else) and installs
# the repository into it (editable, pyproject.toml), so `.venv/bin/python` imports models/, pruning/, ... from anywhere.
PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-requirements

# Nothing on the default path may wait on an unreachable model hub.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-slow test-all diff-upstream golden clean-cache run-edit bench-edit train-edit-base eval-edit run-video bench-video sweep-video train-video-base eval-video eval-egoschema train-llava-base train-llava eval-llava bench-llava

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation \
		--config-settings editable_mode=compat -e .
	@cat requirements.txt pyproject.toml > $(STAMP)

## The default suite (what CI runs): the upstream audit, then every test not marked slow.
test: $(STAMP)
	$(PY) scripts/diff_upstream.py --quiet
	$(PY) -m pytest

## Slow tests only (long end-to-end runs).
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: test test-slow

## Print each fork's diff against the pinned upstream file and check the copied upstream blocks in pruning/; fail on any drift.
diff-upstream: $(STAMP)
	$(PY) scripts/diff_upstream.py

## Regenerate tests/golden/ on purpose (review the diff before committing).
golden: $(STAMP)
	$(PY) scripts/make_golden.py

## Qwen-Image-Edit with reference-token reuse vs the baseline (embedded tiny model; ARGS="..." for more flags).
run-edit: $(STAMP)
	$(PY) scripts/run_with_token_pruning.py --compare $(ARGS)

## Speed of every reuse mode against the baseline on a shape-faithful scaled transformer (not a test).
bench-edit: $(STAMP)
	$(PY) scripts/bench_edit.py $(ARGS)

## Train the embedded Qwen-Image-Edit testbed on the generated edit task into models/trained/qwenimage_edit
## (VAE, then transformer, then assemble; ~1 h on 2 cores; ARGS="--stage transformer --resume" continues a stage).
train-edit-base: $(STAMP)
	$(PY) scripts/train_edit_base.py $(ARGS)

## Reference-token reuse on the trained edit testbed: every mode and schedule and the alternatives (fewer steps,
## diffusers' caches, a smaller reference) on held-out edits, fidelity vs the baseline and the target (ARGS="...").
eval-edit: $(STAMP)
	$(PY) scripts/eval_edit.py $(ARGS)

## PruneVid on Qwen2.5-VL: demo video on the embedded tiny model, default preset vs the baseline (ARGS="..." for more flags).
run-video: $(STAMP)
	$(PY) scripts/run_video.py --compare --visualize outputs_video $(ARGS)

## Speed, KV cache and memory of every PruneVid preset vs the baseline, shape-faithful scaled Qwen2.5-VL (not a test).
bench-video: $(STAMP)
	$(PY) scripts/bench_video.py $(ARGS)

## PruneVid stage-1 sweep (tau x cluster_ratio x temporal_segment_ratio) on the demo video -> stage1_sweep_results.json.
sweep-video: $(STAMP)
	$(PY) scripts/sweep_stage1.py $(ARGS)

## Train the embedded video-QA Qwen2.5-VL from scratch on the generated task into models/trained/video_qa (~1 h on 2 cores;
## ARGS="--resume" continues runs/video_base/checkpoint.pt, ARGS="--overwrite" retrains over the shipped model).
train-video-base: $(STAMP)
	$(PY) scripts/train_video_base.py $(ARGS)

## PruneVid's accuracy on the trained video-QA model: every preset and the alternatives at equal budgets (test split).
eval-video: $(STAMP)
	$(PY) scripts/eval_video.py $(ARGS)

## EgoSchema-style multiple choice, every PruneVid preset, on the generated set (embedded model: accuracy is chance).
eval-egoschema: $(STAMP)
	$(PY) scripts/eval_egoschema.py $(ARGS)

## Retrain the shipped cluttered-scene LLaVA base into models/trained/llava_clutter (~90 min on 2 cores;
## three phases; ARGS="--force" over the shipped one, ARGS="--resume" continues the checkpoints in runs/llava_clutter_base/).
train-llava-base: $(STAMP)
	$(PY) scripts/train_llava_base.py --task clutter $(ARGS)

## LLaVA-1.5 learned merger + pruner heads, GAN-trained on the frozen base (the shipped cluttered-scene base;
## ARGS="--task shapes" on the shapes-VQA base, trained once if missing).
train-llava: $(STAMP)
	$(PY) scripts/train_llava_pruner.py $(ARGS)

## Accuracy / BLEU / tokens / FLOPs of the learned method vs unpruned, random, FastV, DivPrune and VisionZip at equal budgets.
eval-llava: $(STAMP)
	$(PY) scripts/eval_llava_pruning.py $(ARGS)

## Prefill speed of the learned method and the baselines vs unpruned, shape-faithful scaled LLaVA-1.5 (not a test).
bench-llava: $(STAMP)
	$(PY) scripts/bench_llava.py $(ARGS)

clean-cache:
	rm -rf .cache/tiny_models
