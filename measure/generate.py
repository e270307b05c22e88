"""`qtc generate`: text from a decoder through plain ONNX Runtime, with the feed loop a server runs.

The loop for a KV-cache decoder (inputs found by structure, core/decoder.py): one prefill run over the prompt with
an empty past ([batch, kv_heads, 0, head_size]), attention_mask of ones over the prompt and position_ids 0..n-1;
then one run per new token: input_ids [[token]], attention_mask of ones over past + 1, position_ids [[past]], and
each past input fed the present output of the run before. A model without a cache is re-run on the whole
sequence for each token (correct, slow: what serving such a graph costs). Greedy by default; `sample` draws from
the softmax at `temperature`, among the `top_k` most likely tokens when given, from a seeded generator.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qtc.backends import get_backend
from qtc.calibration.data import (
    InputSpec,
    bos_id,
    eos_id,
    load_tokenizer,
    model_inputs,
    next_step_feed,
    text_feed,
    token_input,
    tokenizer_beside,
)
from qtc.errors import QtcError
from qtc.frontends.onnx_file import load_model


@dataclass(frozen=True)
class Sampling:
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0:
            raise QtcError("--temperature must be > 0 and --top-k >= 0")


@dataclass
class Generation:
    tokens: list[int]  # the new tokens only
    ttft_s: float  # prefill: time to the first new token
    decode_s: list[float] = field(default_factory=list)  # each later token's run
    kv_cache: bool = True

    @property
    def decode_tokens_per_s(self) -> float | None:
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else None


class Decoder:
    """One session on a decoder and its inputs, ready to generate many times (bench and agreement reuse it)."""

    def __init__(self, model: str | Path, target: str = "cpu", extra: dict[str, np.ndarray] | None = None) -> None:
        path = Path(model)
        self.extra = dict(extra or {})  # fixed inputs of every run, e.g. a layer-skip `budget` for the request
        graph = load_model(path)  # external data stays memory-mapped
        self.inputs: list[InputSpec] = model_inputs(graph)
        token_input(self.inputs)  # a decoder reads token ids: refuse others here, not at the first run
        self.presents = {s.name: s.present for s in self.inputs if s.present is not None}
        self.session = get_backend(target).session(path)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.logits = next((n for n in self.outputs if "logit" in n), self.outputs[0])

    def _run(self, feed: dict) -> dict:
        return dict(zip(self.outputs, self.session.run(self.outputs, feed | self.extra)))

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop: int | None = None) -> Generation:
        if not prompt:
            raise QtcError("the prompt is empty after tokenization")
        rng = np.random.default_rng(sampling.seed)
        ids = np.array(prompt, dtype=np.int64)
        started = time.perf_counter()
        feed = text_feed(ids, self.inputs)
        outputs = self._run(feed)
        new = [_choose(outputs[self.logits][0, -1], sampling, rng)]
        result = Generation(new, time.perf_counter() - started, kv_cache=bool(self.presents))
        while len(new) < max_new_tokens and new[-1] != stop:
            position = len(prompt) + len(new) - 1
            started = time.perf_counter()
            if self.presents:
                feed = next_step_feed(feed, outputs, np.array([[new[-1]]]), position, self.inputs)
            else:
                feed = text_feed(np.array([*prompt, *new], dtype=np.int64), self.inputs)
            outputs = self._run(feed)
            new.append(_choose(outputs[self.logits][0, -1], sampling, rng))
            result.decode_s.append(time.perf_counter() - started)
        return result


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if not sampling.sample:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < len(scaled):
        cut = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled >= cut, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def generate_text(model: str | Path, prompt: str, *, max_new_tokens: int = 32, tokenizer: str | Path | None = None,
                  sampling: Sampling = Sampling(), target: str = "cpu") -> dict:
    """Tokenize `prompt` (BOS first when the tokenizer has one), generate, and say how fast."""
    if max_new_tokens < 1:
        raise QtcError("--max-new-tokens must be >= 1")
    path = Path(model)
    words = load_tokenizer(_tokenizer_path(path, tokenizer))
    prompt_ids = [*([bos] if (bos := bos_id(words)) is not None else []),
                  *words.encode(prompt, add_special_tokens=False).ids]
    decoder = Decoder(path, target)
    result = decoder.generate(prompt_ids, max_new_tokens, sampling, stop=eos_id(words))
    return {"model": path.name, "prompt": prompt, "prompt_tokens": len(prompt_ids), "tokens": result.tokens,
            "text": words.decode(result.tokens), "kv_cache": result.kv_cache, "ttft_ms": round(result.ttft_s * 1e3, 2),
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "sampling": {"sample": sampling.sample, "temperature": sampling.temperature, "top_k": sampling.top_k,
                         "seed": sampling.seed}}


def _tokenizer_path(model: Path, tokenizer: str | Path | None) -> Path:
    path = Path(tokenizer) if tokenizer else tokenizer_beside(model)
    if path is None:
        raise QtcError(f"no tokenizer: pass --tokenizer, or put tokenizer.json beside {model.name}")
    return path


def _probe(argv: list[str]) -> None:
    """`python -m qtc.measure.generate MODEL PROMPT_LEN NEW_TOKENS`: load, generate once, print peak RSS (JSON)."""
    model, prompt_len, new_tokens = Path(argv[0]), int(argv[1]), int(argv[2])
    decoder = Decoder(model)
    decoder.generate([5 + i % 64 for i in range(prompt_len)], new_tokens)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    _probe(sys.argv[1:])
