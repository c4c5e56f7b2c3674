PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-unit test-integration bench proto lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -e ".[dev]"

demo: install
	$(VENV)/bin/pyflyte run examples/map_model.py wf

test: install
	bash scripts/run-tests.sh

bench: install
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) -m benchmarks

proto: install
	cd flytekitplugins-actor && ../$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		flytekitplugins/actor/protocol/lease.proto

clean:
	rm -rf $(VENV) build dist *.egg-info */*.egg-info
