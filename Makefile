# Verity: the two commands a newcomer needs are `make serve` and `make test`.
# Both create .venv and install on first use; the stamp file makes later runs start at once.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
# Synthetic data and training settings for `make train`: the recipe behind the shipped models
# (`make train-photo VERSION=1.0.0` and `make train-xray VERSION=1.1.0` rebuild the shipped
# checkpoints/photo-default/1.0.0 and xray-default/1.1.0; about 15 and 9 minutes on 2 cores). Photo labels carry finer cues (a misspelt word, a small colour shift) and need more
# examples than X-ray parcels. TRAIN_DIFFICULTY=medium gives the harder sets of the Datasets figures.
TRAIN_N_photo ?= 4000
TRAIN_N_xray ?= 2400
TRAIN_EPOCHS_photo ?= 5
TRAIN_EPOCHS_xray ?= 8
# X-ray sets are written in the forms scanner consoles export (8-bit grey, RGB-encoded grey, pseudo-colour,
# 16-bit; whole scans, crops and small patches), so the shipped model serves what consoles send.
SYNTH_OPTIONS_photo ?=
SYNTH_OPTIONS_xray ?= --export-style mixed
TRAIN_DIFFICULTY ?= easy
TRAIN_IMAGE_SIZE ?= 160
TRAIN_SEED ?= 7
VERSION ?= $(shell date -u +%Y.%m.%d)

.PHONY: install serve test test-fast lint typecheck train train-photo train-xray export bench screenshots clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Verity needs Python 3.11 ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[serve,train,dev,postgres,ray]'
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/verity serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests that train, export, start servers or load torch: under a minute on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not torch"

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy inference api datasets training verity

# Regenerates the shipped default models: synthetic data, fine-tuning from the packaged ImageNet
# weights, ONNX export into checkpoints/ with an INT8 variant where it passes its accuracy gate,
# evaluation on the held-out split.
train: train-photo train-xray

train-photo train-xray: train-%: $(STAMP)
	$(BIN)/verity data synth --modality $* --n $(TRAIN_N_$*) --difficulty $(TRAIN_DIFFICULTY) --seed $(TRAIN_SEED) \
		$(SYNTH_OPTIONS_$*) --out data/synth-$*-$(TRAIN_DIFFICULTY)
	$(BIN)/verity train --data data/synth-$*-$(TRAIN_DIFFICULTY)/manifest.jsonl --modality $* \
		--epochs $(TRAIN_EPOCHS_$*) --image-size $(TRAIN_IMAGE_SIZE) --name $*-default --version $(VERSION) --out checkpoints
	$(BIN)/verity export --checkpoint checkpoints/$*-default/$(VERSION)/model.pt --int8 \
		--val-data data/synth-$*-$(TRAIN_DIFFICULTY)/manifest.jsonl
	$(BIN)/verity eval --model checkpoints/$*-default/$(VERSION)/model.onnx \
		--data data/synth-$*-$(TRAIN_DIFFICULTY)/manifest.jsonl --split test

export: $(STAMP)
	@test -n "$(CHECKPOINT)" || { echo "usage: make export CHECKPOINT=checkpoints/<name>/<version>/model.pt"; exit 2; }
	$(BIN)/verity export --checkpoint $(CHECKPOINT)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# The README's pictures of the inspection console, docs/screenshots/console-{desktop,phone}.png: a server
# on the shipped models, synthetic images, Debian's Chromium (/usr/bin/chromium).
screenshots: $(STAMP)
	$(BIN)/python docs/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
