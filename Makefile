# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv with the pinned stack when it is missing (torch 2.13.0 pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo bench clean

$(VENV)/.installed: requirements.txt requirements-lmms.txt constraints.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-lmms.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: setup
	$(PY) -m recipes.demo

bench: setup
	# Every benchmark script; _common.py is their shared module and profile_pretrain_step.py a profiler that needs
	# a model and corpus (see its --help).
	for f in bench/*.py; do case $$f in */_common.py|*/profile_*.py) continue;; esac; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) demo_output runs
