# Set-up and the two everyday commands. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, from the exact CPU build; everything after is pinned against it (constraints.txt).
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e ".[test,logging,optimizers,quant,lycoris,prep]"
	$(BIN)/python -c "import torch, lorakit; print('torch', torch.__version__, '| lorakit', lorakit.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorakit demo --output_dir demo_output

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py --size tiny --resolution 64 --batch 2

clean:
	rm -rf $(VENV) demo_output
