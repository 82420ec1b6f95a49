# `make demo` and `make test` set up (or reuse) the virtual environment in .venv and run.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= demo_data

.PHONY: demo test venv clean

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

# A tiny SAIL-VL trained on the CPU by 4 processes (tensor parallel 2 x pipeline parallel 2) on the demo data.
demo: $(STAMP) $(DEMO_DATA)/blend.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 4 -m sail_megatron.demo --tp 2 --pp 2 --steps 40 \
		--data $(DEMO_DATA)/blend.yaml --tokenizer $(DEMO_DATA)/raw/tokenizer --seq-length 512 \
		--micro-batch-size 1 --num-microbatches 4 --lr 3e-3

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_DATA)
