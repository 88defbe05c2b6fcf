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

test: venv lint
	$(BIN)/tokenlean models fetch smollm2-135m minilm-l6
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/tokenlean models fetch smollm2-135m
	$(BIN)/tokenlean bench --model smollm2-135m --method sink_window:sink_tokens=4,window=256 \
		--task perplexity --task fidelity --out $(DEMO_OUT)
	@echo "report written to $(DEMO_OUT)/ (report.json, report.md, report.html, *.png)"

clean:
	rm -rf build dist *.egg-info runs/demo
