# PlugKit's commands. Each sets up what it needs first (venv, torch, ComfyUI host); see README.
# The venv: .venv, or PLUGKIT_VENV (e.g. one shared by several clones); tools/setup.sh reads the same.
PLUGKIT_VENV ?= .venv
export PLUGKIT_VENV
PY := $(PLUGKIT_VENV)/bin/python

.PHONY: setup demo test bench clean
setup:
	bash tools/setup.sh

demo: setup
	$(PY) -m tools.demo

# The whole suite, in two processes: the fresh-clone demo test runs its own server beside the test
# process, so it gets a process of its own instead of one holding every earlier test's models (24 GB machines).
test: setup
	$(PY) -m pytest tests --ignore=tests/e2e/test_demo.py
	$(PY) -m pytest tests/e2e/test_demo.py

bench: setup
	$(PY) -m tools.bench $(TECHNIQUES)

clean:
	rm -rf out .pytest_cache
