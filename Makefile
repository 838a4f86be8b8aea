# Two commands on a fresh machine (see README.md):
#   make demo   install into .venv; on the bundled Adult data: preprocess, train, export, predict
#   make test   install with the test extra into .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test bench-input clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m pipelines.tabular --transforms transforms.census \
	    --train data/adult/adult.data --eval data/adult/adult.test \
	    --output $(OUT)/adult --overwrite
	$(PY) -m trainer.task --transformed $(OUT)/adult --model-dir $(OUT)/models
	$(PY) -m trainer.predict --model $(OUT)/models/census --input data/adult/adult.test \
	    --output $(OUT)/predictions.csv --show 5

test: install
	$(PY) -m pytest -q tests

# The trainer's tf.data input against a plain TFRecordDataset + parse_example (issue: >= 0.8x).
bench-input: install
	$(PY) benchmarks/input_pipeline.py

clean:
	rm -rf out build *.egg-info
