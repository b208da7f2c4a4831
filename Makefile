# The README's two commands: `make serve` and `make test`. Everything they need is installed here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 3000
FMNIST := /usr/share/datasets/fashion-mnist
INSTALLED := $(VENV)/.installed
# The image `make image` builds and deploy/ runs (tests/test_deploy.py checks they agree): named by the package version.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE   ?= visionserve:$(VERSION)
# GPU=1: onnxruntime-gpu's own CUDA 13 / cuDNN 9 wheels (its [cuda,cudnn] extras, pinned in
# deploy/requirements-gpu.txt) go into the venv, so a machine with only an NVIDIA driver runs the CUDA provider.
GPU     ?=

.PHONY: help install data test serve bento image gpu-check gpu-wheels evaluate index ood bench-serve bench-peers bench-classifiers bench-explain int8 fp16 bench-train performance loadtest fuzz models-present browser screenshots clean \
	overload soak faults embedding-map ood-autoencoder
.DEFAULT_GOAL := help

help:
	@echo "make serve      install, check data and models, serve every endpoint on http://$(HOST):$(PORT)"
	@echo "make test       install and run the whole test suite"
	@echo "make screenshots  the web page's sections in Chromium: docs/img/web-*.png"
	@echo "make bento      import models/ into BentoML's store and build the bento"
	@echo "make image      the bento as a container image $(IMAGE) (docker or podman; GPU=1: $(IMAGE)-gpu)"
	@echo "make gpu-check  raw onnxruntime-CUDA vs served on a GPU machine: benchmarks/results/gpu.md (skips without CUDA)"
	@echo "                GPU=1 on serve/test/gpu-check installs the CUDA 13 + cuDNN 9 wheels onnxruntime-gpu wants"
	@echo "make index      /similar's indexes (cnn, resnet-student): models/<name>/similarity.faiss (export/index.py)"
	@echo "make ood        OOD methods measured (benchmarks/results/ood.md) and each classifier's ood.npz shipped"
	@echo "make evaluate   evaluate the released models with onnxruntime on the full test split"
	@echo "make bench-serve  raw onnxruntime vs served throughput and latency"
	@echo "make bench-peers  visionserve vs FastAPI, LitServe, BentoML batchable, HTTP floor: benchmarks/results/peers.md"
	@echo "                PEERS_ARGS=\"--duration 15 --rounds 1\" for a short run"
	@echo "make fp16        FP16 variants for the CUDA provider, parity-checked against FP32 (benchmarks/results/fp16.md)"
	@echo "make int8        INT8 (QDQ) variants measured against fp32; released only if they pass (benchmarks/results/int8.md)"
	@echo "make bench-classifiers  raw onnxruntime ms per image of every classifier beside its accuracy"
	@echo "make bench-explain  faithfulness (deletion AUC) and cost of /explain's methods per classifier"
	@echo "make bench-train  training-step time of each architecture, NCHW vs channels_last"
	@echo "make performance  bench-serve, then Locust per endpoint at 4-96 users: docs/PERFORMANCE.md (~15 min)"
	@echo "make loadtest   Locust load test against objectives (serves first if nothing answers); reports/loadtest/"
	@echo "                USERS=$(USERS) SPAWN_RATE=$(SPAWN_RATE) DURATION=$(DURATION) SCENARIO=$(SCENARIO) (all classify segment"
	@echo "                generate smoke available) HOST=$(LOADTEST_URL) WORKERS=$(WORKERS) (N: Locust master + N workers)"
	@echo "                SLO=$(SLO); for remote workers: LOCAL_WORKERS=0 MASTER_BIND=0.0.0.0 MASTER_PORT=5557"
	@echo "make fuzz       schemathesis against GET /openapi.json (serves first if nothing answers); reports/fuzz/"
	@echo "                FUZZ_CASES=$(FUZZ_CASES) FUZZ_SEED=(random) HOST=$(LOADTEST_URL)"
	@echo "make overload   /classify at 3x CAPACITY=$(CAPACITY) req/s for SECONDS=$(SECONDS): shedding, p99, recovery; reports/overload/"
	@echo "make soak       /classify at 70% of CAPACITY for SOAK_SECONDS=$(SOAK_SECONDS): 0 errors, RSS growth <= 5%; reports/soak/"
	@echo "make faults     kill -9 of a worker under load: time to answer again, failures; reports/faults/"
	@echo "                PAUSE_PIDS=\"1234 5678\" SIGSTOPs those processes (e.g. a training) while measuring"

# Re-installs whenever pyproject.toml changes. torch is pinned to the CPU build on this machine's disk.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(INSTALLED) $(if $(GPU),gpu-wheels)

# Not part of the default install: several GB of NVIDIA wheels a CPU machine never loads.
gpu-wheels: $(INSTALLED)
	$(BIN)/python -m pip install -q -r deploy/requirements-gpu.txt

# Fashion-MNIST comes from Debian's package; nothing is downloaded at run time.
data: $(FMNIST)/t10k-labels-idx1-ubyte.gz

$(FMNIST)/t10k-labels-idx1-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FMNIST)."; \
		echo "Install it as root: apt-get install dataset-fashion-mnist (Debian/Ubuntu), then run make again."; \
		exit 1; \
	fi
	@test -f $@ || { echo "dataset-fashion-mnist installed but $@ is missing"; exit 1; }

# The web page's tests (tests/test_web.py) drive Debian's chromium through Playwright: no browser download.
CHROMIUM := /usr/bin/chromium
browser: $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	elif sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "Chromium is missing from $(CHROMIUM) (the web page's browser tests need it)."; \
		echo "Install it as root: apt-get install chromium (Debian), then run make again."; \
		exit 1; \
	fi
	@test -x $@ || { echo "chromium installed but $@ is missing"; exit 1; }

test: install data browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# docs/img/web-{classify,segment,generate,models}.png: the screenshot test of tests/test_web.py, against a
# server of the released models, writing there instead of a temporary folder.
screenshots: install data browser models-present
	VISIONSERVE_SCREENSHOT_DIR=docs/img $(BIN)/python -m pytest tests/test_web.py -q -k screenshots

evaluate: install data
	$(BIN)/python -m export.evaluate_classifier --models models --out benchmarks/results
	$(BIN)/python -m export.evaluate_segmenter --models models --out benchmarks/results
	$(BIN)/python -m export.evaluate_generator --models models --judge models/resnet --out benchmarks/results

# /similar's index of each released classifier whose index fits 20 MB at recall@10 >= 0.99 (export/index.py):
# models/<name>/similarity.faiss, its sha256 and recall in the card; the service loads it at start-up.
index: install data models-present
	$(BIN)/python -m export.index --model models/cnn
	$(BIN)/python -m export.index --model models/resnet-student

# Each /classify answer's `ood`: the methods measured against five OOD sets (benchmarks/results/ood.md) and the
# shipped statistics written to models/<name>/ood.npz with their sha256 in the card (export/evaluate_ood.py).
ood: install data models-present
	$(BIN)/python -m export.evaluate_ood --models models/cnn models/mlp models/resnet-student \
		--ship models/cnn models/mlp models/resnet-student

# Released models come from training + export, never from a download: say what to run when they are missing.
models-present:
	@ls models/*/model.onnx >/dev/null 2>&1 || { \
		echo "No exported models in models/. Train and export one first, for example:"; \
		echo "  $(BIN)/python -m training.train_classifier --preset release-cnn --seed 0"; \
		echo "  $(BIN)/python -m export.classifier --run runs/cnn/<stamp> --name cnn"; \
		exit 1; }

# Server settings are VISIONSERVE_* environment variables (docs/SERVING.md), e.g. VISIONSERVE_WORKERS=2 make serve.
# models/ goes into BentoML's model store first (idempotent: keyed by each model's SHA-256); the server then serves
# exactly the tags models/*/card.json name, whatever else the store holds (docs/SERVING.md, "Which models are served").
serve: install data models-present
	$(BIN)/python -m service.model_store import models
	$(BIN)/bentoml serve service.app:VisionService --host $(HOST) --port $(PORT)

# A bento of the service pinned to the tags models/*/card.json name (bentofile.yaml is the template, the models
# list is generated from the cards); `bentoml containerize` takes it from there.
bento: install models-present
	$(BIN)/python -m service.model_store import models
	$(if $(GPU),$(BIN)/python deploy/gpu_bentofile.py bentofile.yaml deploy/requirements-gpu.txt bentofile-gpu.yaml)
	$(BIN)/python -m service.model_store build-bento models $(if $(GPU),--bentofile bentofile-gpu.yaml)

# The bento as an image (bentoml containerize); needs a working docker or podman. GPU=1 builds from
# bentofile-gpu.yaml, generated by deploy/gpu_bentofile.py: bentofile.yaml plus the CUDA 13 / cuDNN 9 wheels.
CONTAINER_BACKEND ?= $(shell (docker info >/dev/null 2>&1 && echo docker) || (podman info >/dev/null 2>&1 && echo podman))
image: bento
	@test -n "$(CONTAINER_BACKEND)" || { echo "make image: neither docker nor podman can run containers here"; exit 1; }
	$(BIN)/bentoml containerize visionserve:latest --backend $(CONTAINER_BACKEND) -t $(IMAGE)$(if $(GPU),-gpu)

# Raw onnxruntime-CUDA vs the served models on a GPU (benchmarks/gpu_check.py); prints why it skipped elsewhere.
gpu-check: install models-present
	$(BIN)/python -m benchmarks.gpu_check --models models --out benchmarks/results

# `make print-IMAGE`: a variable as make computes it (tests/test_deploy.py reads IMAGE and PORT this way).
print-%:
	@echo $($*)

# Raw onnxruntime vs served, one run; writes benchmarks/results/serve.{json,md}.
bench-serve: install data models-present
	$(BIN)/python -m benchmarks.bench_serve --out benchmarks/results

# visionserve as shipped against the servers users would pick instead (benchmarks/peers.py), same CNN, same Locust
# load. The peers live in their own venv, .venv-peers (pyproject's `peers` extra + the service's onnxruntime, numpy
# and pillow pins), so that no peer's pins change what .venv serves with.
PEERS_VENV := .venv-peers
PEERS_ARGS ?=
$(PEERS_VENV)/.installed: pyproject.toml $(INSTALLED)
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(BIN)/python -m benchmarks.peers --requirements > $(PEERS_VENV)/requirements.txt
	$(PEERS_VENV)/bin/python -m pip install -q -r $(PEERS_VENV)/requirements.txt
	touch $@

bench-peers: install data models-present $(PEERS_VENV)/.installed
	$(BIN)/python -m benchmarks.peers --out benchmarks/results $(PEERS_ARGS)

# INT8 variants of the CNN and the ResNet student, released only if they keep accuracy and gain speed (issue 22);
# then each released variant served against its source, the served speed-up written into its card
int8: install data models-present
	$(BIN)/python -m export.quantize
	$(BIN)/python -m benchmarks.int8_served --write-cards

# FP16 graphs for the CUDA provider (VISIONSERVE_PRECISION): models/<name>/model-fp16.onnx and the card's
# features.fp16 section, parity-checked against FP32 on the full test split (benchmarks/results/fp16.md).
fp16: install data models-present
	$(BIN)/python -m export.fp16 --model models/mlp models/cnn models/resnet-student models/densenet models/segnet

# Raw onnxruntime ms per image of every released classifier beside its accuracy; benchmarks/results/classifier_cost.*
bench-classifiers: install data models-present
	$(BIN)/python -m benchmarks.classifier_cost --out benchmarks/results

# PCA and t-SNE maps of every released classifier's test embeddings and k-means (k=10) ARI/NMI beside raw pixels,
# the autoencoder's bottleneck and the 8x8 digits' MLP; benchmarks/results/embedding_map/ (a few minutes)
embedding-map: install data models-present
	$(BIN)/python -m benchmarks.embedding_map

# Reconstruction error of the released autoencoder as an OOD score, AUROC per set; benchmarks/results/ood_autoencoder.*
ood-autoencoder: install data models-present
	$(BIN)/python -m benchmarks.ood_autoencoder

# Deletion AUC (saliency vs random vs brightest-first) and cost of /explain's methods per classifier; benchmarks/results/explain.*
bench-explain: install data models-present
	nice -n 10 $(BIN)/python -m benchmarks.explain

# Training-step medians per architecture, both memory formats alternating in one run; benchmarks/results/train_step.*
bench-train: install
	$(BIN)/python -m benchmarks.train_step --out benchmarks/results

# docs/PERFORMANCE.md and benchmarks/results/performance.json (benchmarks/performance.py): bench-serve, then per
# endpoint p50/p99 at 8/32/64 Locust users and the capacity within loadtests/slo.yaml. Installs nothing.
performance:
	$(BIN)/python -m benchmarks.performance

# Load test (loadtests/run.py): uses the service answering at HOST, or starts one there and stops it after;
# Locust headless for DURATION; reports in reports/loadtest/<UTC stamp>/; exits non-zero naming each objective
# of SLO that was missed. HOST is a URL (http://10.0.0.5:3000) or, as for `make serve`, a host with PORT.
USERS      ?= 8
SPAWN_RATE ?= 8
DURATION   ?= 20s
SCENARIO   ?= all
WORKERS    ?= 0
SLO        ?= loadtests/slo.yaml
LOADTEST_URL = $(if $(findstring ://,$(HOST)),$(HOST),http://$(HOST):$(PORT))

loadtest: install data
	$(BIN)/python -m loadtests.run --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
		--scenario $(SCENARIO) --host $(LOADTEST_URL) --workers $(WORKERS) --slo $(SLO) \
		$(if $(LOCAL_WORKERS),--local-workers $(LOCAL_WORKERS)) $(if $(MASTER_BIND),--master-bind-host $(MASTER_BIND)) \
		$(if $(MASTER_PORT),--master-port $(MASTER_PORT))

# Fuzzing (loadtests/fuzz.py): schemathesis generates FUZZ_CASES requests (plus its boundary cases) from the
# server's own OpenAPI document and checks every answer against it; uses the service at HOST or starts one.
# Reports in reports/fuzz/<UTC stamp>/; exits non-zero on any failure (schemathesis.log has a curl per failure).
FUZZ_CASES ?= 1000
FUZZ_SEED  ?=

fuzz: install
	$(BIN)/python -m loadtests.fuzz --cases $(FUZZ_CASES) --host $(LOADTEST_URL) --out reports/fuzz \
		$(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# Hardening runs (docs/SERVING.md, "Overload and faults"): each starts its own server on a free port.
CAPACITY     ?= 420
SECONDS      ?= 60
SOAK_SECONDS ?= 600
PAUSE_PIDS   ?=
PAUSE        = $(if $(strip $(PAUSE_PIDS)),--pause-pids $(PAUSE_PIDS))

overload: install data models-present
	$(BIN)/python -m loadtests.overload --capacity $(CAPACITY) --seconds $(SECONDS) $(PAUSE)

soak: install data models-present
	$(BIN)/python -m loadtests.soak --capacity $(CAPACITY) --seconds $(SOAK_SECONDS) $(PAUSE)

faults: install data models-present
	$(BIN)/python -m loadtests.faults $(PAUSE)

clean:
	rm -rf $(VENV) .pytest_cache
