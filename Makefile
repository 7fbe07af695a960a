# One command each: `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,local]"
	touch $(STAMP)

# Two pytest workers, one test file each at a time: much of an end-to-end test is waiting on process start-up.
test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadfile -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/mpft demo

bench: $(STAMP)
	$(PY) bench/score_throughput.py
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
