# Two entry points for a fresh machine: `make demo` (offline end-to-end run) and `make test`.
# Both create .venv and install what they need; torch is installed first, pinned, so pip never
# replaces it with another build (on a CUDA machine the same pin gives the CUDA wheel).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
WORKDIR ?= demo_output
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast sysdeps bench clean mutate

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Java runs pycocoevalcap's tokenizer and METEOR; Chromium drives the web-page test.
# Installed when missing and apt is usable; the tests that need them skip with a notice otherwise.
sysdeps:
	@if ! command -v java >/dev/null 2>&1 || ! { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless chromium >/dev/null \
				|| echo "sysdeps: could not install java/chromium; their tests will be skipped"; \
		else echo "sysdeps: java or chromium missing and apt-get unavailable; their tests will be skipped"; fi; \
	fi

demo: install
	$(BIN)/prefixcap demo --workdir $(WORKDIR)

test: install sysdeps
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m bench.run_all --quick

# Mutation testing of the core functions (docs/development.md): each mutant runs against the fast
# tests that cover it; prints the killed share per module and the mutants left alive. Slow: about
# an hour on 2 cores (MUTATE_JOBS parallel mutants). mutmut caches results in mutants/.
MUTATE_JOBS ?= 2
mutate: install
	set -f; OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATE_JOBS) $$($(BIN)/python tests/mutation/score.py --globs)
	$(BIN)/python tests/mutation/score.py

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache mutants
