# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# `make demo` installs the library and the demo's extra; `make test` adds the test tools.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test clean

$(VENV)/.installed-%: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(if $(filter test,$*),demo$(comma)dev,demo)]'
	touch $@

comma := ,

install: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/sacv demo --out demo-out

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile  # two processes, whole modules each (module fixtures run once)

clean:
	rm -rf $(VENV) demo-out
