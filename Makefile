# dsphere: see README.md. `make serve` and `make test` install first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install test serve train evaluate reproduce bench soak lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel; pinned so nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[serve,train,dev]"
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider

serve: install
	$(VENV)/bin/uvicorn app.main:app --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check app training tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
