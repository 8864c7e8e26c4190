# Thin targets over scripts/. `make test` and `make demo` work on a fresh machine.
SHELL := /bin/bash
.PHONY: setup test test-core demo bench

setup:
	bash scripts/setup.sh

test: setup
	bash scripts/run_tests.sh

demo: setup
	bash scripts/demo.sh

bench: setup
	.venv/bin/python bench/attention.py
