# dsphere: see README.md. `make serve` and `make test` install first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
HOST ?= 0.0.0.0
PORT ?= 8000
# the Open Inference Protocol's gRPC port of `make serve` (app/grpc_server.py); GRPC_PORT= turns it off
GRPC_PORT ?= 8001

.PHONY: install test serve images train train-rejection train-served evaluate evaluate-rejection evaluate-serving evaluate-served \
	precision-records publish choose-variant reproduce \
	bench soak attack-service lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel; pinned so nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[serve,openvino,train,dev]"
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider

MODEL ?= fashion-mnist-baseline
PRECISION ?= fp32
WORKERS ?= 2

serve: install
	# The latest version of MODEL in model_store/: by default the model whose worst-case defended rate is highest
	# (docs/results/model-comparison-3.0.0.md: the baseline CNN 2.0.0); make serve MODEL=fashion-mnist-dsphere for
	# the D-SphereNet. make serve PRECISION=bf16: OpenVINO's bf16 path where the CPU has it (docs/SERVING.md).
	# WORKERS gunicorn workers (gunicorn.conf.py: 1 inference thread each, /metrics summed over them, one query
	# history, a reload reaches them all); 2 measured best on this 2-core machine (docs/SERVING.md, "Workers").
	DSPHERE_MODEL_NAME=$(MODEL) DSPHERE_PRECISION=$(PRECISION) DSPHERE_GRPC_PORT=$(GRPC_PORT) DSPHERE_GRPC_HOST=$(HOST) \
		DSPHERE_WORKERS=$(WORKERS) $(VENV)/bin/gunicorn -c gunicorn.conf.py --bind $(HOST):$(PORT) app.main:app

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

# The 2.0.0 campaign (docs/results/model-comparison-2.0.0.md): one recipe for the D-SphereNet
# (input-truncated + WM) and the baseline CNN: 2 natural epochs, then 10 N-FGSM epochs at eps 0.1
# (eps ramp over 2, lr 1e-3 /10 at 50 % and 75 %), the overfitting guard keeping best/. About
# 1 h per model on 2 cores; every step resumes (--resume) or is skipped when its checkpoint is
# kept. The chosen checkpoints are committed under checkpoints/, so export and evaluation never
# need runs/.
RECIPE := --mode nfgsm --eps 0.1 --eps-warmup-epochs 2 --epochs 10 --lr-milestones 0.5,0.75 \
	--checkpoint-every 250 --guard-every 500 --resume
WARM := --mode natural --epochs 2 --checkpoint-every 200 --resume
DSPHERE := --arch dsphere --corr truncated --head wm
BASELINE := --arch baseline --head softmax

# $(call run,NAME,OPTIONS): train runs/v2/NAME unless checkpoints/NAME is already kept (committed),
# continuing from checkpoints/in-progress/NAME (its last/ and best/) when an earlier session left
# one; then keep it.
define run
	test -f checkpoints/$(1)/checkpoint.json || { \
		if [ -d checkpoints/in-progress/$(1)/last ] && [ ! -d runs/v2/$(1)/last ]; then \
			mkdir -p runs/v2/$(1) && cp -r checkpoints/in-progress/$(1)/. runs/v2/$(1)/; fi; \
		$(PY) -m training train --out runs/v2/$(1) $(2) && $(PY) -m training keep runs/v2/$(1) checkpoints/$(1); }
endef

train: install
	$(call run,warm-dsphere-wm-truncated,$(DSPHERE) $(WARM))
	$(call run,warm-baseline,$(BASELINE) $(WARM))
	$(call run,warm-dsphere-wm-cosine,--arch dsphere --corr cosine --head wm $(WARM))
	$(call run,dsphere-wm-truncated-nfgsm,$(DSPHERE) --init-from checkpoints/warm-dsphere-wm-truncated $(RECIPE))
	$(call run,baseline-nfgsm,$(BASELINE) --init-from checkpoints/warm-baseline $(RECIPE))
	# the other D-SphereNet variant, to choose on validation (docs/results/variant-choice-2.0.0.md)
	$(call run,dsphere-wm-cosine-nfgsm,--arch dsphere --corr cosine --head wm --init-from checkpoints/warm-dsphere-wm-cosine $(RECIPE))

# The 3.0.0 campaign (docs/METHOD.md, "Training the verdict"): rejection training of both models from their 2.0.0
# checkpoints (the D-SphereNet's weight-multiplier head kept; the baseline's softmax head swapped for a cosine one,
# W-Softmax), 6 epochs (D-SphereNet) or 2 (baseline) at lr 2.5e-4 (/10 at 50 % and 75 %), the rule-aware guard choosing
# best/ on the defended rate. The D-SphereNet's run was stopped by hand at iteration 1,287 when its guard had fallen
# 7 points below its best (checkpoints/dsphere-wm-truncated-rejection/summary.json); `keep --stopped` sealed best/.
REJECTION := --mode rejection --reject-cones fixed --reject-attack-steps 2 --eps 0.1 --lr 2.5e-4 --lr-milestones 0.5,0.75 --checkpoint-every 250 --guard-every 250 \
	--resume
train-rejection: install
	$(call run,dsphere-wm-truncated-rejection,$(DSPHERE) --init-from checkpoints/dsphere-wm-truncated-nfgsm \
		--epochs 6 $(REJECTION))
	$(call run,baseline-rejection,--arch baseline --head wsoftmax --init-from checkpoints/baseline-nfgsm --epochs 2 \
		$(subst --guard-every 250,--guard-every 143,$(REJECTION)))

# The 4.0.0 campaign (docs/METHOD.md, "Training the verdict"): rejection training against the served rule itself
# (--reject-cones served: each class's threshold rho*(mean+std) measured on the model every 25 iterations), a
# PGD-3 training attack, 2 epochs from the 3.0.0 checkpoints at lr 2.5e-4, the guard choosing best/.
SERVED := --mode rejection --reject-cones served --reject-attack-steps 3 --eps 0.1 --lr 2.5e-4 --lr-milestones 0.5,0.75 \
	--epochs 2 --checkpoint-every 100 --guard-every 143 --resume
train-served: install
	$(call run,dsphere-wm-truncated-served,$(DSPHERE) --init-from checkpoints/dsphere-wm-truncated-rejection $(SERVED))
	$(call run,baseline-served,--arch baseline --head wsoftmax --init-from checkpoints/baseline-rejection $(SERVED))

# Their full evaluations, every attack including those aimed at the verdict, budgets sized for 2 shared cores:
# PGD-100 restarts 1 -> 2, APGD 50 iterations, transfer PGD-50, the rule attack 10 steps per target and loss with
# restarts 1 -> 2 (its cosine loss on the 3 likeliest wrong classes is the adaptive attack's, which does not run
# apart), orthogonal PGD-20, Square on the rule 300 queries. D-SphereNet on 1,000 test images, the baseline on the
# first 300; published, then side by side with 2.0.0 and the 1.0.0 baseline.
EVAL_REJECTION := --attacks fgsm,pgd,apgd-ce,apgd-dlr,square,transfer,rule,orthogonal,rule-square --pgd-restarts 1 \
	--apgd-iter 50 --transfer-steps 50 --rule-steps 10 --rule-cosine-targets 3 --rule-max-restarts 2 \
	--orthogonal-steps 20 --rule-square-queries 300 --n-budget-check 50 --n-sweep 50 --sweep-eps 0,0.05,0.1,0.2,0.3 \
	--n-distal 50
evaluate-rejection: install
	$(MAKE) publish NAME=fashion-mnist-dsphere VERSION=3.0.0 CKPT=checkpoints/dsphere-wm-truncated-rejection \
		SUBS="checkpoints/baseline-nfgsm" EVAL_OPTS="$(EVAL_REJECTION)"
	$(MAKE) publish NAME=fashion-mnist-baseline VERSION=2.0.0 CKPT=checkpoints/baseline-rejection \
		SUBS="checkpoints/dsphere-wm-truncated-nfgsm" EVAL_OPTS="$(EVAL_REJECTION)" N_EVAL=300
	$(PY) -m training compare docs/results/fashion-mnist-dsphere-3.0.0/report.json \
		docs/results/fashion-mnist-baseline-2.0.0/report.json docs/results/fashion-mnist-dsphere-2.0.0/report.json \
		docs/results/fashion-mnist-baseline-1.0.0/report.json --out docs/results/model-comparison-3.0.0.md

# 3.1.0: 3.0.0's checkpoint exported in the serving form (training/serving_graph.py, docs/SERVING.md), a new
# version with its own calibration and full evaluation under the 3.0.0 protocol, side by side with 3.0.0.
evaluate-serving: install
	$(MAKE) publish NAME=fashion-mnist-dsphere VERSION=3.1.0 CKPT=checkpoints/dsphere-wm-truncated-rejection \
		SUBS="checkpoints/baseline-nfgsm" EVAL_OPTS="$(EVAL_REJECTION)"
	$(PY) -m training compare docs/results/fashion-mnist-dsphere-3.1.0/report.json \
		docs/results/fashion-mnist-dsphere-3.0.0/report.json \
		--out docs/results/fashion-mnist-dsphere-3.1.0/compared-with-3.0.0.md

# The versions trained against the served rule (make train-served), each published only when its kept checkpoint
# beats its predecessor's on the validation guard (python -m training choose-on-validation), then evaluated at
# the documented default budgets (no cuts; many hours each on 2 cores, resumable from its attack cache) on the
# first 1,000 test images, and compared paired on the same images (McNemar, bootstrap interval).
evaluate-served: install
	$(PY) -m training choose-on-validation checkpoints/dsphere-wm-truncated-served \
		--must-beat checkpoints/dsphere-wm-truncated-rejection
	$(MAKE) publish NAME=fashion-mnist-dsphere VERSION=4.0.0 CKPT=checkpoints/dsphere-wm-truncated-served \
		SUBS="checkpoints/baseline-nfgsm"
	$(PY) -m training choose-on-validation checkpoints/baseline-served --must-beat checkpoints/baseline-rejection
	$(MAKE) publish NAME=fashion-mnist-baseline VERSION=3.0.0 CKPT=checkpoints/baseline-served \
		SUBS="checkpoints/dsphere-wm-truncated-nfgsm"
	$(PY) -m training compare docs/results/fashion-mnist-dsphere-4.0.0/report.json \
		docs/results/fashion-mnist-baseline-3.0.0/report.json --out docs/results/model-comparison-4.0.0.md

# The served versions' bf16 precision records (OpenVINO against the fp32 reference, from each version's own
# evaluation and its attack cache; a few minutes each): without one, DSPHERE_PRECISION=bf16 serves fp32.
# Needs a CPU with AVX512-BF16 or AMX (elsewhere `training precision` refuses) and the versions' local attack
# caches: the 4.0.0 generation's come from `make evaluate-served`.
PRECISION_RECORDS := fashion-mnist-dsphere/3.1.0 fashion-mnist-baseline/2.0.0 \
	fashion-mnist-dsphere/4.0.0 fashion-mnist-baseline/3.0.0
precision-records: install
	$(foreach v,$(PRECISION_RECORDS),{ test -f model_store/$(v)/precision/openvino-bf16.json || $(PY) -m training \
		precision model_store/$(v) --evaluation docs/results/$(subst /,-,$(v)); } &&) true

# Full evaluation (n = 1000; each about 30-40 min on 2 cores, resumable from its cache): each
# model is exported to a staging store, attacked (transfer both ways between the two models, and
# from two natural substitutes), then published to model_store/ with the report's figures.
evaluate: install
	$(MAKE) publish NAME=fashion-mnist-dsphere VERSION=2.0.0 CKPT=checkpoints/dsphere-wm-truncated-nfgsm \
		SUBS="checkpoints/baseline-nfgsm checkpoints/warm-baseline checkpoints/warm-dsphere-wm-cosine"
	$(MAKE) publish NAME=fashion-mnist-baseline VERSION=1.0.0 CKPT=checkpoints/baseline-nfgsm \
		SUBS="checkpoints/dsphere-wm-truncated-nfgsm checkpoints/warm-baseline checkpoints/warm-dsphere-wm-cosine"
	$(PY) -m training compare docs/results/fashion-mnist-dsphere-2.0.0/report.json \
		docs/results/fashion-mnist-baseline-1.0.0/report.json --out docs/results/model-comparison-2.0.0.md
	$(PY) -m training figure2 --out docs/results/figure2 --runs-dir runs/figure2

N_EVAL ?= 1000
publish: install
	test -d runs/v2/staging/$(NAME)/$(VERSION) || $(PY) -m training export $(CKPT) --store runs/v2/staging \
		--name $(NAME) --version $(VERSION) --n-attack 200
	$(PY) -m training evaluate runs/v2/staging/$(NAME)/$(VERSION) --n-examples $(N_EVAL) --threads 2 $(EVAL_OPTS) \
		$(foreach s,$(SUBS),--substitute $(s)) --out docs/results/$(NAME)-$(VERSION)
	test -d model_store/$(NAME)/$(VERSION) || $(PY) -m training export $(CKPT) --name $(NAME) --version $(VERSION) \
		--evaluation docs/results/$(NAME)-$(VERSION)/report.json

# The D-SphereNet variant chosen on validation, never on test: both variants' staged exports
# attacked on the first 1,000 validation images (FGSM, PGD-100 with restarts, adaptive), side by side.
VARIANTS := fashion-mnist-dsphere:checkpoints/dsphere-wm-truncated-nfgsm \
	fashion-mnist-dsphere-cosine:checkpoints/dsphere-wm-cosine-nfgsm
variant = $(word 1,$(subst :, ,$(1)))
variant_ckpt = $(word 2,$(subst :, ,$(1)))
choose-variant: install
	$(foreach v,$(VARIANTS),test -d runs/v2/staging/$(call variant,$(v))/2.0.0 || $(PY) -m training export \
		$(call variant_ckpt,$(v)) --store runs/v2/staging --name $(call variant,$(v)) --version 2.0.0 --n-attack 200 &&) true
	$(foreach v,$(VARIANTS),$(PY) -m training evaluate runs/v2/staging/$(call variant,$(v))/2.0.0 \
		--split validation --n-examples 1000 --threads 2 --attacks fgsm,pgd,adaptive --pgd-restarts 1 \
		--no-sanity --no-figures --out runs/v2/validation/$(call variant,$(v)) &&) true
	$(PY) -m training compare $(foreach v,$(VARIANTS),runs/v2/validation/$(call variant,$(v))/report.json) \
		--out runs/v2/validation/variant-choice.md

reproduce: install
	# Table 1 grid, quick protocol (about 1.5 h on 2 cores; cached per cell, resumable).
	$(PY) -m training reproduce --protocol quick --out runs/reproduce --seed 1
	mkdir -p docs/results/reproduce-fashion-mnist-quick
	cp runs/reproduce/reproduction.json runs/reproduce/reproduction.md docs/results/reproduce-fashion-mnist-quick/

bench: install
	$(PY) bench/bench_models.py
	$(PY) bench/bench_sphere_conv.py
	PYTHONPATH=. $(PY) bench/bench_service.py
	$(PY) bench/bench_query_history.py
	$(PY) bench/bench_v2.py

soak: install
	# Long reliability runs (2.5-4 min on 2 cores): 100k requests, overload burst, 50 hot reloads, SIGTERM.
	# Writes docs/results/soak/soak.json and the generated block of docs/RELIABILITY.md.
	$(PY) bench/soak.py

# Query attacks through the API only against a live server, the query-history detector off and on (#26): ART's
# Square (the rule in its loss), SimBA, HopSkipJump, Boundary and Sign-OPT, then Square at 10,000 queries on 20 images,
# then the adaptive attacks (blinding, OARS-style steps, spread over addresses and two workers on Redis, restarts,
# slowed past the store's expiry). Resumes from docs/results/query-history/attacks/*.json; hours on 2 cores.
ATTACK := PYTHONPATH=. $(PY) bench/attack_service.py
attack-service: install
	$(ATTACK) --images 50 --queries 2000 --attacks square,simba,hsj,boundary,signopt
	$(ATTACK) --images 20 --queries 10000 --attacks square
	$(ATTACK) --images 50 --queries 2000 --attacks square-blind,square-oars,square-spread,square-restart,square-slow
