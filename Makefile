# make install | make demo | make test   (each target installs what it needs first; all idempotent)
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.install-stamp
SEEDS   ?= 0

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml tools/install.sh
	bash tools/install.sh $(VENV)
	touch $(STAMP)

demo: install
	$(PY) -m crossmodal_kd.cli bench configs/bench/demo.yaml --seeds $(SEEDS)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m crossmodal_kd.cli bench configs/bench/avdigits.yaml

clean:
	rm -rf runs $(VENV) *.egg-info
