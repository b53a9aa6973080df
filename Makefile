# The two commands of the README, each on a fresh clone: a venv is created (or refreshed when
# pyproject.toml changes) and ganforge installed into it with every extra.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test models bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	bash scripts/install_perf_analyzer.sh $(VENV)
	@touch $(STAMP)

venv: $(STAMP)

# Train a small DCGAN, export it, start tritonserver, generate over gRPC, write PNGs.
demo: venv
	$(VENV)/bin/ganforge demo --out demo-out

test: venv
	$(PY) -m pytest

# Re-train and re-export the models shipped in model_repository/ (see docs/models.md).
models: venv
	bash scripts/make_models.sh

clean:
	rm -rf demo-out .pytest_cache
