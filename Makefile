# Two commands on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenlean-installed
DEMO_OUT ?= runs/demo

.PHONY: venv test lint demo clean

venv: $(STAMP)

# On a machine without an NVIDIA GPU install the CPU build of torch first (it lies on local
# disk here); the package itself only asks for a torch range, so GPU users keep their CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true; fi
	$(BIN)/python -m pip install -q -e ".[dev,lmeval]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import tokenlean, tokenlean.eval, tokenlean.attention, tokenlean.compressors"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything the tests read: two zoo models and the BIG-bench sources of the BBH tasks.
test: venv lint
	$(BIN)/tokenlean models fetch smollm2-135m minilm-l6
	$(BIN)/tokenlean data fetch bbh
	$(BIN)/python -m pytest -q

# One run, one report: prompt compression (tokens saved, needle retention, generation sped up by
# the shorter prompt) and Token Prepending (embedding quality), against the unpatched model.
demo: venv
	$(BIN)/tokenlean models fetch smollm2-135m
	$(BIN)/tokenlean bench --model smollm2-135m --compressor default --rate 0.5 --rate 0.33 \
		--method token_prepending:exit_layer=15 --task needle --task sts_wordsim353 \
		--prompt-tokens 1024 --new-tokens 16 --repeats 3 --out $(DEMO_OUT) --overwrite
	@echo "report written to $(DEMO_OUT)/ (report.html, report.md, report.json, *.png)"

clean:
	rm -rf build dist *.egg-info runs/demo
