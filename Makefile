# `make demo` and `make test` set up (or reuse) the virtual environment in .venv and run.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= demo_data

.PHONY: demo stages test lint format venv clean gpu-check

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The embedded demo dataset: real photos from scikit-image, captions and conversations, a tokenizer.
$(DEMO_DATA)/blend.yaml: $(STAMP)
	$(VENV)/bin/sail-data demo --out $(DEMO_DATA) --overwrite

# A tiny SAIL-VL trained on the CPU by 4 processes (tensor parallel 2 x pipeline parallel 2) on the demo
# data, through the same driver and launch script as a cluster run. Starts fresh each time.
# TINY=tiny-aimv2 runs the AIMv2 (SAIL-VL-1.5/1.6 layout) twin instead, here and in `make stages`.
TINY ?= tiny
LAUNCH := GPUS_PER_NODE=4 PYTHON=$(PY) TORCHRUN=$(VENV)/bin/torchrun bash examples/launch/single_node.sh
DEMO_ARGS := data.tokenizer=$(DEMO_DATA)/raw/tokenizer

demo: $(STAMP) $(DEMO_DATA)/blend.yaml
	rm -rf runs/$(TINY)/demo
	$(LAUNCH) examples/configs/$(TINY)/demo.yaml $(DEMO_ARGS) data.path=$(DEMO_DATA)/blend.yaml
	@echo "curves: runs/$(TINY)/demo/curves.png   TensorBoard: $(VENV)/bin/tensorboard --logdir runs/$(TINY)/demo/tensorboard"

# The five SAIL-VL stages in a row on the tiny model, each starting from the previous stage's checkpoint.
STAGES := 1-pretrain-alignment 2-pretrain-advance 3-sft-knowledge 4-sft-instruction 5-sft-preference
stages: $(STAMP) $(DEMO_DATA)/blend.yaml
	rm -rf $(addprefix runs/$(TINY)/,$(STAGES))
	for s in $(STAGES); do \
		data=$$(case $$s in *pretrain*) echo captions;; *) echo sft;; esac); \
		$(LAUNCH) examples/configs/$(TINY)/$$s.yaml $(DEMO_ARGS) data.path=$(DEMO_DATA)/$$data || exit 1; \
	done

test: lint
	$(PY) -m pytest -q --durations=25

# ruff (pyproject.toml): lint rules (undefined names, unused imports, style errors, import order) and the
# formatter's layout; `make format` applies both fixes.
LINTED := sail_megatron kernels tools tests benchmarks
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

# On a machine with a CUDA GPU (within 8 minutes on one H100/H200): the GPU tests, Transformer Engine vs local
# layers (grouped-GEMM experts included), the ViT's forward and backward in FP8, the ViT as CUDA graphs, bf16 and
# FP8 training throughput and MFU, compiled Triton kernels, DALI decoding and CPU-written checkpoints loaded into
# TE layers (`run.init_from`); a torchrun restart with `--only restart`;
# writes gpu_check/report.md, gpu_check/report.json and gpu_check/summary.txt (a few lines to paste into an
# issue; docs/gpu.md). `tools/gpu_check.py --list` lists the parts, `--only PART` runs one. Exits 2 on a
# machine without CUDA. Parts that need Transformer Engine are reported as skipped when it is missing;
# INSTALL_TE=1 installs it into the venv first (a long build, not counted in the check's time).
TE_REQUIREMENT := transformer-engine[pytorch]>=2.9,<2.12
gpu-check: $(STAMP)
	$(if $(INSTALL_TE),$(PY) -m pip install --no-build-isolation '$(TE_REQUIREMENT)')
	$(PY) tools/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_DATA) runs
