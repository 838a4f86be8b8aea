# Two commands on a fresh machine (see README.md):
#   make demo   install into .venv; on the bundled Adult data: preprocess, train, export, predict
#   make test   install with the test extra into .venv, lint, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install tfjs demo demo-images demo-text demo-regression fashion-mnist lint test bench bench-wide bench-small bench-cache bench-encode bench-input bench-images bench-serve clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The TF.js export's tools (python -m trainer.export_tfjs, tfjs/predict.mjs): the converter
# (tensorflowjs 4.22, which needs TensorFlow 2.19) in a venv of its own, $(TFJS_ENV), pinned by
# tfjs/requirements.txt; the pure JavaScript runtime (@tensorflow/tfjs, no native binary) in
# tfjs/node_modules, pinned by tfjs/package-lock.json (no install scripts run).
TFJS_ENV ?= .tfjs-env

$(TFJS_ENV)/.installed: tfjs/requirements.txt
	rm -rf $(TFJS_ENV)
	$(PYTHON) -m venv $(TFJS_ENV)
	$(TFJS_ENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	    -r tfjs/requirements.txt
	touch $@

tfjs/node_modules/.installed: tfjs/package.json tfjs/package-lock.json
	cd tfjs && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $@

tfjs: $(TFJS_ENV)/.installed tfjs/node_modules/.installed

demo: install
	$(PY) -m pipelines.tabular --transforms transforms.census \
	    --train data/adult/adult.data --eval data/adult/adult.test \
	    --output $(OUT)/adult --overwrite
	$(PY) -m trainer.task --transformed $(OUT)/adult --model-dir $(OUT)/models
	$(PY) -m trainer.predict --model $(OUT)/models/census --input data/adult/adult.test \
	    --output $(OUT)/predictions.csv --show 5

# The image pipeline on the bundled Fashion-MNIST sample (1,000 train + 200 test PNGs).
demo-images: install
	$(PY) -m pipelines.images --train data/fashion_mnist/sample/train \
	    --eval data/fashion_mnist/sample/test --output $(OUT)/fmnist_sample --overwrite \
	    --image-size 28 28 --channels 1
	$(PY) -m trainer.task --transformed $(OUT)/fmnist_sample --model-dir $(OUT)/models \
	    --model-name fmnist_sample --epochs 10 --batch-size 64
	$(PY) -m trainer.predict --model $(OUT)/models/fmnist_sample \
	    --input data/fashion_mnist/sample/test --output $(OUT)/image_predictions.csv --show 5

# The text recipe on the bundled SMS Spam Collection (4,862 messages): TF-IDF of the words,
# train, export, predict raw messages.
demo-text: install
	$(PY) -m pipelines.tabular --transforms transforms.sms_spam \
	    --train data/sms_spam/sms_spam.csv --eval-fraction 0.2 --output $(OUT)/sms_spam --overwrite
	$(PY) -m trainer.task --transformed $(OUT)/sms_spam --model-dir $(OUT)/models --epochs 5 \
	    --batch-size 64
	$(PY) -m trainer.predict --model $(OUT)/models/sms_spam --input data/sms_spam/sms_spam.csv \
	    --output $(OUT)/text_predictions.csv --show 5

# Regression on the bundled USGS earthquakes (1,707 events): every kind of transformed feature.
demo-regression: install
	$(PY) -m pipelines.tabular --transforms transforms.earthquakes \
	    --train data/usgs_earthquakes/usgs_earthquakes.csv --eval-fraction 0.2 \
	    --output $(OUT)/earthquakes --overwrite
	$(PY) -m trainer.task --transformed $(OUT)/earthquakes --model-dir $(OUT)/models --epochs 30 \
	    --batch-size 64
	$(PY) -m trainer.predict --model $(OUT)/models/earthquakes \
	    --input data/usgs_earthquakes/usgs_earthquakes.csv --output $(OUT)/magnitudes.csv --show 5

# The full Fashion-MNIST set (needs the Debian package dataset-fashion-mnist): tar shards,
# preprocess, train the default CNN, evaluate on the 10,000 test images.
fashion-mnist: install
	$(PY) data/fashion_mnist/build.py --layout tar --out $(OUT)/fmnist_shards
	$(PY) -m pipelines.images --train '$(OUT)/fmnist_shards/train-*.tar' \
	    --eval '$(OUT)/fmnist_shards/test-*.tar' --output $(OUT)/fmnist --overwrite \
	    --image-size 28 28 --channels 1
	$(PY) -m trainer.task --transformed $(OUT)/fmnist --model-dir $(OUT)/models \
	    --model-name fmnist --epochs 5

# The linter (ruff.toml); `make test` runs it first.
lint: install
	$(VENV)/bin/ruff check .

# Two test processes (pytest-xdist), each file's tests in one of them so that a file's shared
# runs are made once: about 11 minutes on two cores instead of 20 in one process. The TF.js
# tests need the converter's venv and the Node runtime (`make tfjs`, once).
test: lint tfjs
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The tabular pipeline against the tutorial pipeline, TFT's TFXIO path and a single-process
# bound, on 1M rows (3 runs each), then on 4M rows with 1 and 2 workers (about 30 minutes).
bench: install
	$(PY) benchmarks/tabular_pipeline.py --rows 1000000 --runs 3 --scale-rows 4000000 --scale-runs 1

# Wide tables: the tabular pipeline at 30, 100, 300 and 1,000 columns on 100,000 rows, against
# TF Transform's TFXIO pipeline at 300 columns (issue 15's targets; the longest benchmark).
bench-wide: install
	$(PY) benchmarks/wide_table.py --rows 100000 --widths 30,100,300,1000 --runs 3

# Small runs: a 1,000-row census run against importing TensorFlow, TF Transform and Beam.
bench-small: install
	$(PY) benchmarks/small_run.py --rows 1000 --runs 5

# The analysis cache: an 11th span added to 10 cached ones of 200,000 rows, against analyzing all.
bench-cache: install
	$(PY) benchmarks/analysis_cache.py --spans 11 --rows 200000 --runs 3

# The sink's numpy Example encoder against tfx_bsl's, on a wide and a narrow batch.
bench-encode: install
	$(PY) benchmarks/example_encoding.py

# The trainer's tf.data input against a plain TFRecordDataset + parse_example (issue: >= 0.8x).
bench-input: install
	$(PY) benchmarks/input_pipeline.py

# The image pipeline against a single-process tf.io decode-and-resize loop (issue: >= 0.5x).
bench-images: install
	$(PY) benchmarks/image_pipeline.py

# HTTP serving (python -m trainer.serve) against the SavedModel in-process: p50/p99 latency and
# throughput with 1 and 16 clients (trains a census model first; about 3 minutes in all).
bench-serve: install
	$(PY) benchmarks/serve_latency.py

clean:
	rm -rf out build *.egg-info
