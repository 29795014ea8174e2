# xnorcam — `make help` lists the targets.
#
# Everything runs inside .venv, created on first use. Stamp files inside the
# venv remember which requirements were installed, so re-runs are instant and a
# changed requirements file triggers a re-install.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
HOST ?=
INSTALL_ARGS ?=
# ../shared beside the clone (datasets, the ARM meter); XNORCAM_SHARED overrides.
SHARED ?= $(if $(XNORCAM_SHARED),$(XNORCAM_SHARED),$(CURDIR)/../shared)
ARMCOST ?= $(SHARED)/tools/armcost/armcost

VENV_STAMP := $(VENV)/.xnorcam-venv
RUNTIME_STAMP := $(VENV)/.xnorcam-runtime
DEV_STAMP := $(VENV)/.xnorcam-dev

.DEFAULT_GOAL := help
.PHONY: help setup setup-dev run test test-arm test-emulated bench bench-arm bench-train train train-shipped pack eval soak fuzz lint deploy clean distclean

help: ## list the targets
	@echo "xnorcam: binary-network object detection for the Raspberry Pi Zero 2 W"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: PYTHON=$(PYTHON) ARGS='...' WEB=$(WEB) (run) PYTEST_ARGS='...' (test) HOST=user@host (deploy)"

$(VENV_STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "xnorcam needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) -V 2>&1). Try: make PYTHON=python3.11 ..." >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
		echo "Could not create $(VENV). On Debian/Ubuntu/Raspberry Pi OS: sudo apt install python3-venv" >&2; exit 1; }
	@touch $@

$(RUNTIME_STAMP): requirements.txt $(VENV_STAMP)
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt requirements-train.txt $(VENV_STAMP)
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements-train.txt
	@touch $@ $(RUNTIME_STAMP)

setup: $(RUNTIME_STAMP) ## create .venv and install the runtime requirements
setup-dev: $(DEV_STAMP) ## create .venv with runtime, test and training requirements

# make run's web preview: the page with the live picture, the status and the events (127.0.0.1: this machine only).
WEB ?= 127.0.0.1:8080
DEMO_SNAPSHOTS ?= $(or $(TMPDIR),/tmp)/xnorcam-demo-snapshots
run: setup ## run the demo with the shipped model: the picture in the desktop's browser (or a window), else at the printed URL; events on stdout; ARGS="..." adds flags
	$(PY) -m app --source demo --preview auto --web $(WEB) --snapshots $(DEMO_SNAPSHOTS) --log - --only-events $(ARGS)

test: setup-dev ## run the test suite (no tests collected is a failure)
	@rc=0; $(PY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure" >&2; fi; \
	exit $$rc

test-arm: ## run tests/arm/kernel_checks.py under the aarch64 meter (skipped without ../shared)
	@if [ ! -x "$(ARMCOST)" ]; then \
		echo "test-arm: SKIPPED: armcost not found at $(ARMCOST) (set ARMCOST=... or XNORCAM_SHARED=...)"; exit 0; fi; \
	test -f tests/arm/kernel_checks.py || { echo "test-arm: tests/arm/kernel_checks.py is missing" >&2; exit 1; }; \
	PYTHONPATH=$(CURDIR) "$(ARMCOST)" run tests/arm/kernel_checks.py

# make test-emulated EMULATED=trixie for the other release. Needs root, debootstrap and the network; the roots and
# downloads are cached in .emulated/ (XNORCAM_EMULATED_CACHE overrides), so a second run only reinstalls.
EMULATED ?= bookworm
test-emulated: setup ## the whole stack on an emulated arm64 Debian: install.sh, the warm-up, 20 frames checked (5 min cached, 9-29 min first)
	XNORCAM_HOST_PYTHON=$(abspath $(PY)) bash tests/emulated/arm64.sh $(EMULATED)

bench: setup ## time the pipeline, then binary vs float network (last line: JSON)
	$(PY) benchmarks/bench_pipeline.py
	$(PY) -m app bench --json

bench-arm: setup ## estimate Pi Zero 2 W timings with the aarch64 instruction meter
	$(PY) benchmarks/bench_arm.py

train: setup-dev ## train the person detector: its float twin, then the binary net from it (train/configs/person.toml)
	$(PY) -m train.train --config train/configs/person.toml --float-twin
	$(PY) -m train.train --config train/configs/person.toml

# The shipped models/person.xnc came from twelve stages, each from an earlier one (models/README.md, "Training
# and how to reproduce"; docs/experiments.md says why), plus the large twin that teaches the distillation stage
# and the twin of the last data, its yardstick. The first ten trained on the person sets (person-sets.toml), the
# last two on person.toml's mix of everyday scenes and person-free images. train-shipped replays them: about
# 20 hours on 2 CPU cores. The ternary stage starts from the distillation stage's exported model file and the
# mix stage from the ternary one's (train.from_model), so the lineage does not depend on kept checkpoints.
LINEAGE ?= runs/lineage
TRAIN := $(PY) -m train.train --config train/configs/person-sets.toml
TRAIN_MIX := $(PY) -m train.train --config train/configs/person.toml
L := $(LINEAGE)
LARGE_PEOPLE := --augment mosaic=0.1 --augment copy_paste=0.3 --augment scale_min=0.75
BF16_EMA := --set train.precision=bf16 --set train.ema=0.999
train-shipped: setup-dev ## replay the twelve training stages of the shipped model and its twins (hours on a CPU; exports models/person.xnc)
	$(TRAIN) --float-twin --set train.minutes=40 --no-export --out $(L)/1-float
	$(TRAIN) --set train.init_from=$(L)/1-float/best.pt --set train.teacher=$(L)/1-float/best.pt \
		--set train.minutes=85 --no-export --out $(L)/2-binary
	$(TRAIN) --set model.res_blocks=2 --set train.init_from=$(L)/2-binary/best.pt --set train.teacher=$(L)/1-float/best.pt \
		--set train.lr=5e-4 --set train.minutes=44 --no-export --out $(L)/3-res2
	$(TRAIN) --set model.res_blocks=2 --set train.init_from=$(L)/3-res2/best.pt --set train.teacher=$(L)/1-float/best.pt \
		--set train.lr=5e-4 --set train.precision=bf16 --set train.val_every_minutes=15 --set train.minutes=130 \
		--no-export --out $(L)/4-bf16
	$(TRAIN) --set model.res_blocks=2 --resume $(L)/4-bf16/last.pt --set train.teacher=$(L)/1-float/best.pt \
		--set train.lr=3e-4 $(BF16_EMA) --set train.val_every_minutes=14 --set train.minutes=112 --no-export --out $(L)/5-ema
	$(TRAIN) --set model.res_blocks=3 --set train.init_from=$(L)/5-ema/last.pt --set train.teacher=$(L)/1-float/best.pt \
		--set train.distill=0.5 --set train.lr=3e-4 $(BF16_EMA) --set train.val_every_minutes=20 --set train.minutes=135 \
		--no-export --out $(L)/6-res3
	$(TRAIN) --set model.res_blocks=3 --set train.init_from=$(L)/6-res3/best.pt --set train.distill=0 $(LARGE_PEOPLE) \
		--set train.lr=3e-4 $(BF16_EMA) --set train.val_every_minutes=20 --set train.minutes=105 --no-export --out $(L)/7-large
	$(TRAIN) --float-twin --set model.res_blocks=3 --set train.init_from=$(L)/1-float/best.pt $(LARGE_PEOPLE) \
		--set train.lr=1e-3 $(BF16_EMA) --set train.val_every_minutes=15 --set train.minutes=55 --no-export --out $(L)/twin-large
	$(TRAIN) --set model.res_blocks=3 --set train.init_from=$(L)/7-large/best.pt --set train.teacher=$(L)/twin-large/best.pt \
		--set train.distill=1 $(LARGE_PEOPLE) --set train.lr=1e-3 $(BF16_EMA) --set train.compile=true \
		--set train.val_every_minutes=20 --set train.minutes=105 --no-export --out $(L)/8-distill
	$(TRAIN) --set model.res_blocks=3 --eval-only --checkpoint last --out $(L)/8-distill --export-to $(L)/8-distill/person.xnc
	$(PY) -m train.from_model $(L)/8-distill/person.xnc $(L)/8-imported/last.pt
	$(TRAIN) --set model.res_blocks=3 --set 'model.ternary=[2,4]' --set train.init_from=$(L)/8-imported/last.pt \
		--set train.distill=0 $(LARGE_PEOPLE) --set train.lr=1e-3 $(BF16_EMA) --set train.compile=true --set train.threads=1 \
		--set train.val_every_minutes=20 --set train.minutes=95 --no-export --out $(L)/9-ternary
	$(TRAIN) --set model.res_blocks=3 --set 'model.ternary=[2,4]' --set train.init_from=$(L)/9-ternary/last.pt \
		--set train.distill=0 $(LARGE_PEOPLE) --set train.lr=3e-4 $(BF16_EMA) --set train.compile=true --set train.threads=2 \
		--set train.val_every_minutes=10 --set train.minutes=20 --no-export --out $(L)/10-ternary
	$(TRAIN) --set model.res_blocks=3 --set 'model.ternary=[2,4]' --eval-only --checkpoint best --out $(L)/10-ternary \
		--export-to $(L)/10-ternary/person.xnc
	$(PY) -m train.from_model $(L)/10-ternary/person.xnc $(L)/10-imported/last.pt
	$(TRAIN_MIX) --float-twin --set model.res_blocks=3 --set train.lr=2e-3 $(LARGE_PEOPLE) $(BF16_EMA) \
		--set train.compile=true --set train.threads=1 --set train.val_every_minutes=20 --set train.minutes=100 \
		--no-export --out $(L)/twin-mix
	$(TRAIN_MIX) --set model.res_blocks=3 --set 'model.ternary=[2,4]' --set train.init_from=$(L)/10-imported/last.pt \
		--set train.distill=0 $(LARGE_PEOPLE) --set train.lr=1e-3 $(BF16_EMA) --set train.compile=true --set train.threads=1 \
		--set train.val_every_minutes=15 --set train.minutes=70 --no-export --out $(L)/11-mix
	$(TRAIN_MIX) --set model.res_blocks=3 --set 'model.ternary=[2,4]' --set train.init_from=$(L)/11-mix/last.pt \
		--set train.distill=0 $(LARGE_PEOPLE) --set train.lr=5e-4 $(BF16_EMA) --set train.compile=true --set train.threads=1 \
		--set train.val_every_minutes=20 --set train.minutes=100 --no-export --out $(L)/12-mix
	$(TRAIN_MIX) --set model.res_blocks=3 --set 'model.ternary=[2,4]' --eval-only --checkpoint last --out $(L)/12-mix

bench-train: setup-dev ## training steps: default, glibc keeping freed memory, bf16 forwards, and compiled, same run (last line: JSON)
	$(PY) benchmarks/bench_train_step.py

# A CUDA machine without network access gets pycocotools as a wheel for its Python (WHEEL_PY, 3.12 by default).
WHEEL_PY ?= 3.12
pack: setup-dev ## pack the training caches (JPEG) and fetch the pycocotools wheel, for training on a CUDA machine: runs/carry and .whl (train/gpu.sh)
	$(PY) -m train.pack --config train/configs/person.toml
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(WHEEL_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl "$$(grep -E '^pycocotools==' requirements-dev.txt)"

eval: setup-dev ## mAP of the shipped model through the runtime Detector
	$(PY) -m evaluation $(ARGS)

soak: setup ## long run of the pipeline: memory, drops, log rotation
	$(PY) benchmarks/soak.py

fuzz: setup-dev ## property-based runs of the loaders and detect(): >= 2000 cases each, counts printed
	XNORCAM_FUZZ_EXAMPLES=2000 $(PY) -m pytest -q -m fuzz tests/ --hypothesis-profile=fuzz

.PHONY: probe
probe: setup-dev ## hostile inputs against python -m app and python -m evaluation (~5 min; docs/hostile-input.md; last line: JSON)
	$(PY) tests/reliability/probe.py $(ARGS)

lint: setup-dev ## ruff check app evaluation train tests benchmarks
	$(PY) -m ruff check $(wildcard app evaluation train tests benchmarks)

# HOST and INSTALL_ARGS reach deploy/deploy.sh as environment data, never pasted into the recipe's shell text;
# $(value ...) keeps make from expanding them either. The script checks both and refuses anything else.
unexport HOST INSTALL_ARGS  # exporting a command-line variable would expand it, $(shell ...) and all
deploy: export XNORCAM_DEPLOY_HOST := $(value HOST)
deploy: export XNORCAM_DEPLOY_ARGS := $(value INSTALL_ARGS)
deploy: ## copy the project to HOST over ssh and install it there: make deploy HOST=pi@xnorcam.local
	@bash deploy/deploy.sh

clean: ## remove caches (keeps .venv)
	rm -rf .pytest_cache .hypothesis .ruff_cache .numba_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## remove caches and .venv
	rm -rf $(VENV)
