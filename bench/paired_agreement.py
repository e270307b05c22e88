"""Greedy agreement of two decoders with float, paired by prompt: which one stays on float's path longer?

    python bench/paired_agreement.py FLOAT/model.onnx A/model.onnx B/model.onnx [--prompts 50]

`qtc bench` gives each model's share of identical continuations and mean first-divergence position against float,
each with its own interval; two models' intervals can overlap while one is ahead on nearly every prompt. This runs
the same zh-news prompts (the first 64 tokens of the first N eval paragraphs, as `qtc bench`), 32 greedy tokens
each, and bootstraps the mean per-prompt difference of first-divergence positions (A minus B).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qtc.calibration.data import load_tokenizer, tokenizer_beside
from qtc.measure.bench import prompts
from qtc.measure.generate import Decoder

NEW_TOKENS = 32


def first_divergence(model: list[list[int]], reference: list[list[int]]) -> np.ndarray:
    return np.array([next((i for i, (a, b) in enumerate(zip(m, r)) if a != b), len(r)) for m, r in zip(model, reference)],
                    dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("float_model", type=Path)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    chosen = prompts(load_tokenizer(tokenizer_beside(args.float_model)), args.prompts, 64)
    runs = {}
    for name, path in (("float", args.float_model), ("a", args.a), ("b", args.b)):
        decoder = Decoder(path)
        runs[name] = [decoder.generate(prompt, NEW_TOKENS).tokens for prompt in chosen]
    a, b = first_divergence(runs["a"], runs["float"]), first_divergence(runs["b"], runs["float"])
    draws = np.random.default_rng(0).integers(0, len(chosen), size=(10_000, len(chosen)))
    means = (a - b)[draws].mean(axis=1)
    print(json.dumps({"prompts": len(chosen), "a": str(args.a), "b": str(args.b), "first_divergence_a": a.mean(),
                      "first_divergence_b": b.mean(), "a_minus_b": (a - b).mean(),
                      "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
                      "a_longer": float(np.mean(a > b)), "b_longer": float(np.mean(a < b))}, indent=1))


if __name__ == "__main__":
    main()
