# dsphere: see README.md. `make serve` and `make test` install first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install test serve images train evaluate reproduce bench soak lint clean

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
	$(VENV)/bin/uvicorn app.main:app --host $(HOST) --port $(PORT) --timeout-graceful-shutdown 20

images:
	# Serving images with podman, no registry needed: a debootstrap Debian 12 base (made once, as root),
	# dsphere:cpu, dsphere:gpu (on a stand-in base where the CUDA image cannot be pulled) and a
	# Prometheus stand-in. docs/DEPLOYMENT.md, "Building and running without Docker".
	bash deploy/local-image.sh

lint: install
	$(VENV)/bin/ruff check app training support tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

train: install
	# The bundled default model (about 70 min on 2 cores): natural warm start, then FGSM-RS (eps 0.1).
	$(PY) -m training train --out runs/dsphere-fgsm --mode fgsm --adv-weight 0.5 --natural-epochs 2 \
		--eps-warmup-epochs 0.5 --epochs 6 --lr-milestones 0.7,0.9 --checkpoint-every 200
	$(PY) -m training export runs/dsphere-fgsm/final --name fashion-mnist-dsphere --n-attack 1000 --pgd-steps 20

evaluate: install
	# Full report of the bundled model (white-box gradients from its own model.onnx weights); the
	# transfer substitutes are two cells of `make reproduce` (seed 1, independent of the model's seed 0).
	$(PY) -m training evaluate --store model_store --name fashion-mnist-dsphere --version 1.0.0 \
		--substitute runs/reproduce/cells/baseline-fgsm/run/final \
		--substitute runs/reproduce/cells/dsphere-wm-fgsm/run/final \
		--out docs/results/fashion-mnist-dsphere-1.0.0 --n-examples 1000
	$(PY) -m training figure2 --out docs/results/figure2 --runs-dir runs/figure2

reproduce: install
	# Table 1 grid, quick protocol (about 1.5 h on 2 cores; cached per cell, resumable).
	$(PY) -m training reproduce --protocol quick --out runs/reproduce --seed 1
	mkdir -p docs/results/reproduce-fashion-mnist-quick
	cp runs/reproduce/reproduction.json runs/reproduce/reproduction.md docs/results/reproduce-fashion-mnist-quick/

bench: install
	$(PY) bench/bench_sphere_conv.py
	$(PY) bench/bench_service.py

soak: install
	# Long reliability runs (2.5-4 min on 2 cores): 100k requests, overload burst, 50 hot reloads, SIGTERM.
	# Writes docs/results/soak/soak.json and the generated block of docs/RELIABILITY.md.
	$(PY) bench/soak.py
