# Two entry points (see README): `make demo` runs the main job end to end, `make test` runs the tests.
# Both build their own virtual environment first; torch comes first, pinned to the CPU wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.qtc-installed
OUT    ?= out

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[torch,data,test,bench]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m qtc.models.tiny_llama --out $(OUT)/tiny-llama
	$(BIN)/qtc compile $(OUT)/tiny-llama/model.onnx --recipe w8a8 --calib zh-news --samples 32 --seq-len 256 \
		-o $(OUT)/tiny-llama.w8a8.onnx
	$(BIN)/qtc inspect $(OUT)/tiny-llama.w8a8.onnx

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/compile_vs_ort.py
	$(BIN)/python bench/big_model_memory.py

clean:
	rm -rf $(OUT) .pytest_cache
