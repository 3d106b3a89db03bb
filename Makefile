# Two commands on a fresh machine (each creates .venv and installs what is missing):
#   make lab    the offline quick lab: zero-shot -> full fine-tuning -> LoRA -> comparison table (~1 min on 2 cores)
#   make test   ruff + the test suite (what CI runs)
# make floors: the oldest supported versions (pyproject.toml's floors) in .venv-floors, then the quick lab once.
# On a GPU machine choose the torch build yourself: make lab TORCH="torch" (the default is the pinned CPU wheel).

VENV ?= .venv
FLOORS_VENV ?= .venv-floors
PYTHON ?= python3
TORCH ?= torch==2.13.0
LAB_DIR ?= runs/lab
BIN := $(VENV)/bin

.PHONY: install lab test floors clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch first: the pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lab: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/lab.py --quickstart --output_dir $(LAB_DIR) --overwrite_output_dir

test: install
	$(BIN)/ruff check dialogsum tools scripts tests
	$(BIN)/python -m pytest -q

floors:
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(FLOORS_VENV)/bin/python .ci/floors.py pyproject.toml > $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install --quiet -c $(FLOORS_VENV)/floors.txt -e .
	$(FLOORS_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|accelerate|peft|huggingface.hub|datasets|safetensors) "
	HF_HUB_OFFLINE=1 $(FLOORS_VENV)/bin/python scripts/lab.py --quickstart --output_dir $(FLOORS_VENV)/lab \
		--overwrite_output_dir --max_train_steps 30 --checkpointing_steps 15 --eval_steps 15 \
		--load_best_model_at_end --lora_args=--merge_lora

clean:
	rm -rf $(VENV) $(FLOORS_VENV) runs
