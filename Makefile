# Thin targets over scripts/. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
.PHONY: setup test demo bench soak engines tabletop-model docker-test

setup:
	bash scripts/setup.sh

test: setup
	bash scripts/run_tests.sh

demo: setup
	bash scripts/demo.sh

bench: setup
	source scripts/env.sh && python bench/pipeline.py && python bench/attention.py && python bench/refiner.py --sam-type tiny

soak: setup
	source scripts/env.sh && python bench/soak.py --duration 600

engines: setup
	source scripts/env.sh && python engines/build_engines.py $(ENGINE_ARGS)

tabletop-model: setup
	bash scripts/build_tabletop_model.sh

# Builds docker/Dockerfile.debian with podman, runs `make demo` and the node's health check in it (not part of `make test`).
docker-test:
	bash docker/podman/docker_test.sh
