# The one entry point: every job, test and check runs through a target here.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The stamp is keyed on pyproject.toml's content: a second run installs nothing,
# a changed dependency list reinstalls.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

NAME ?= animals
ARTIFACTS ?= artifacts
TRAIN_ARGS ?=
PORT ?= 3000
# podman's settings for this project (deploy/containers.conf); nothing system-wide is changed.
CONTAINERS_CONF ?= $(CURDIR)/deploy/containers.conf
export CONTAINERS_CONF
# The Debian packages that build and run the images.
IMAGE_PACKAGES := podman runc debootstrap

.PHONY: help install train audit export serve predict samples build containerize base-image image training-image k8s-validate bench soak test test-fast lint docs clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,serve,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP) ## Create or refresh .venv from pyproject.toml

train: $(STAMP) ## Train, evaluate, export and publish the model on the built-in dataset
	bash tests/system-packages.sh opencv-doc || echo "note: without opencv-doc the report measures no real handwritten digits"
	$(PY) -m training --name $(NAME) --output $(ARTIFACTS) $(TRAIN_ARGS)

audit: $(STAMP) ## Audit DATA=<folder> (default: the built-in set) into AUDIT_OUTPUT (audit/): duplicates, label errors, odd files
	$(PY) -m training audit --data $(or $(DATA),animals) --output $(or $(AUDIT_OUTPUT),audit) $(AUDIT_ARGS)

export: $(STAMP) ## Re-export and publish the latest artifact (ARTIFACT=dir to choose one)
	$(PY) -m training export --artifact $(or $(ARTIFACT),$(ARTIFACTS)/$(NAME)/latest)

serve: $(STAMP) ## Serve the latest published model on PORT (3000); MODEL_TAG or MODEL_PATH pick another
	MODEL_NAME=$${MODEL_NAME:-$(NAME)} $(VENV)/bin/bentoml serve service.service:ImageClassifier --port $(PORT)

predict: $(STAMP) ## Classify IMAGES=<files or folders> with the latest model (PREDICT_ARGS="--format csv")
	@test -n "$(IMAGES)" || { echo "usage: make predict IMAGES=<file or folder> [PREDICT_ARGS=...]"; exit 2; }
	$(PY) -m service.predict $(IMAGES) $(PREDICT_ARGS)

samples: $(STAMP) ## Write held-out test images of the latest model to samples/ (with labels.csv)
	$(PY) -m training samples --artifact $(or $(ARTIFACT),$(ARTIFACTS)/$(NAME)/latest) --output samples

build: $(STAMP) ## Build the serving Bento (bentoml build) from the published model; prints its tag
	$(VENV)/bin/bentoml build --output tag | sed 's/^__tag__://'

containerize: build ## Build the Bento's OCI image with a Docker engine (FROM python:3.11-slim)
	$(VENV)/bin/bentoml containerize image-classifier:latest --image-tag image-classifier:latest

base-image: ## Make the local Debian base image of both images, once (MIRROR=url overrides apt's)
	bash tests/system-packages.sh $(IMAGE_PACKAGES)
	bash deploy/base-image.sh

image: build ## Build the serving image from the Bento with podman (CA_BUNDLE=pem for a proxy's CA)
	bash tests/system-packages.sh $(IMAGE_PACKAGES)
	bash deploy/image.sh serving

training-image: ## Build the training image with podman (CA_BUNDLE=pem for a proxy's CA)
	bash tests/system-packages.sh $(IMAGE_PACKAGES)
	bash deploy/image.sh training

k8s-validate: $(STAMP) ## Render every kustomize overlay and validate it against the Kubernetes schemas
	bash k8s/validate.sh

bench: $(STAMP) ## Benchmark the service (load from wrk) against its in-process limits and a naive Keras service
	bash tests/system-packages.sh wrk
	$(PY) -m benchmarks --report --model $(or $(ARTIFACT),$(ARTIFACTS)/$(NAME)/latest) $(BENCH_ARGS)

DURATION ?= 60
soak: $(STAMP) ## Load with faults: good and bad input, a worker killed half-way (DURATION=60 s)
	$(PY) -m benchmarks.soak --model $(or $(ARTIFACT),$(ARTIFACTS)/$(NAME)/latest) --duration $(DURATION)

# The tests run on TEST_WORKERS pytest-xdist workers (one a core of the 2-core machines they are
# sized for), a module's tests on one worker, so that its fixtures are made once (loadfile: the
# xdist_group marks of loadgroup are lost under pytest 9, whose node ids xdist 3.8 cannot
# suffix), the longest modules first (tests/conftest.py, which also shares the session's tiny
# model across the workers). The 10 slowest tests and the total close every run, so that a
# change that adds a slow test shows it (README, "Development": the figures of the last run).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP) ## Run every test, the slow end-to-end ones included (installs the Debian packages they drive)
	bash tests/system-packages.sh
	$(PYTEST) --durations=10

test-fast: $(STAMP) ## Run the tests that train nothing and start no server
	bash tests/system-packages.sh
	$(PYTEST) -m "not slow"

docs: $(STAMP) ## Regenerate the docs' option and exit-status tables from the code
	$(PY) -m docs.options_tables

lint: $(STAMP) ## Lint and check formatting
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: ## Remove caches and build outputs (keeps .venv and artifacts/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
