# The two commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# One worker per trial: on one machine two one-worker trials at a time finish the tuning run sooner
# than one two-worker trial at a time (docs/performance.md, "Workers and trials"). On a cluster, give each trial
# as many workers as it has GPUs.
demo: $(STAMP)
	$(VENV)/bin/samtone tune --set scaling.num_workers=1

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
