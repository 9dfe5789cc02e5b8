# The two commands of the README quickstart, and the benchmarks.
#   make quickstart   set up .venv, run the CPU quickstart, print the result
#   make test         set up .venv with test tools, run the whole test suite (four test files at a
#                     time: most of its time is spent waiting on servers and subprocesses)
PY := .venv/bin/python

.PHONY: quickstart test setup bench
setup:
	scripts/setup.sh

quickstart: setup
	scripts/quickstart.sh

test:
	scripts/setup.sh --test
	scripts/test-services.sh
	$(PY) -m pytest -q --durations=15 --numprocesses=4 --dist=loadfile --no-loadscope-reorder

bench: setup
	$(PY) -m bench --threads 1 --out bench/results/cpu-1thread.json
