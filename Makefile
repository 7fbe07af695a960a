# One command each: `make demo` and `make test` create the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv lint test test-fast demo bench gpu-wheels gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,local]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Tests and demo run in a network namespace of their own (loopback only): Ray binds its ports on every interface.
LOOPBACK_ONLY := infra/loopback_only.sh

# Two pytest workers, one test file each at a time: much of an end-to-end test is waiting on process start-up.
test: $(STAMP)
	$(LOOPBACK_ONLY) $(PY) -m pytest tests -n 2 --dist loadfile

test-fast: $(STAMP)
	$(LOOPBACK_ONLY) $(PY) -m pytest tests -n 2 --dist loadfile -m "not slow"

demo: $(STAMP)
	$(LOOPBACK_ONLY) $(VENV)/bin/mpft demo

bench: $(STAMP)
	$(LOOPBACK_ONLY) $(PY) bench/score_throughput.py
	$(LOOPBACK_ONLY) $(PY) bench/train_step.py

# The GPU check needs only PyTorch, open_clip and the project's own code. `make gpu-wheels` (here, with pip's index)
# downloads the packages a bare GPU image lacks into .whl/ (about 5 MB, CPython 3.12 on x86_64 Linux by default);
# `make gpu-check` (there; `bash bench/gpu_check.sh` where make is missing) installs them beside that machine's
# PyTorch and runs bench/gpu_check.py: two processes, three epochs, failure + resume, reload, scoring.
GPU_PYTHON_VERSION ?= 3.12
# typing_extensions too: pydantic imports names newer than the ones an image's torch may have come with
GPU_WHEELS := open_clip_torch ftfy wcwidth pydantic pydantic_core annotated-types typing-inspection typing_extensions

gpu-wheels:
	mkdir -p .whl
	for pkg in $(GPU_WHEELS); do \
	  pin=$$(grep -iE "^$$pkg==" constraints.txt) || { echo "$$pkg is not pinned in constraints.txt"; exit 1; }; \
	  $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .whl "$$pin" || exit 1; \
	done
	ls -l .whl

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
