PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The generated lease_pb2*.py come from this grpcio-tools (protobuf 4.25.1 gencode), so that they load with every
# protobuf from 4.25.1 on: the floor the packages declare. It lives in its own venv, apart from .venv's newest protobuf.
GRPCIO_TOOLS ?= grpcio-tools==1.62.3
PROTO_VENV ?= .venv-proto

.PHONY: install demo test test-scale test-unit test-integration bench proto lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -e ".[dev]"

demo: install
	$(VENV)/bin/pyflyte run examples/map_model.py wf

test: install
	bash scripts/run-tests.sh

test-scale: install
	FLYTE_ACTORS_SCALE=1 $(PY) -m pytest tests/integration/test_map_scale.py -p no:cacheprovider -q -rs -k large_map

bench: install
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) -m benchmarks

proto:
	test -x $(PROTO_VENV)/bin/python || $(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install -q "$(GRPCIO_TOOLS)"
	cd flytekitplugins-actor && ../$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		--grpc_python_out=. flytekitplugins/actor/protocol/lease.proto

clean:
	rm -rf $(VENV) $(VENV)-* build dist *.egg-info */*.egg-info
