"""Evaluation tasks on Chinese workloads. Each task scores one unit (a paragraph, a review, a sentence) at a time
and returns per-unit columns, so that `qtc.measure.evaluation` can aggregate them and bootstrap paired intervals.

- `zh-news-ppl`: bits per character on the zh-news eval split (tokenizer-independent: summed next-token NLL in
  bits over the characters the predicted tokens cover) and token perplexity; against a baseline also the mean
  next-token KL(baseline || model) and top-1 agreement.
- `zh-reviews-acc`: accuracy on the zh-reviews eval split, from a 2-way classifier's logits, or zero-shot for
  a decoder by comparing the likelihood of the two label words after a prompt.
- `minilm-sts`: cosine between the model's sentence embedding and the baseline's, on held-out news sentences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qtc.calibration.data import InputSpec, bos_id, next_step_feed, text_feed
from qtc.errors import QtcError
from qtc.util.arrays import log_softmax

LN2 = np.log(2.0)
# Zero-shot prompt for decoders: "<review>\n评价：" followed by 好 (good) or 差 (bad).
REVIEW_PROMPT = "{text}\n评价："
REVIEW_LABELS = ("差", "好")  # index = label (0 negative, 1 positive)


@dataclass
class Runner:
    """A session and how to feed it: one model as the task sees it."""

    session: object
    inputs: list[InputSpec]
    output: str
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # fixed feeds, e.g. a layer-skip `budget`

    @property
    def has_cache(self) -> bool:
        return any(spec.present is not None for spec in self.inputs)

    def run(self, ids: np.ndarray) -> np.ndarray:
        """Logits for a token window. A KV-cache decoder is scored through its cache, as it runs when it serves:
        a prefill of the first half (empty past), then the second half fed with the present cache that prefill
        returned, so quantized caches and the past-reading attention path are in the score."""
        if not self.has_cache or ids.size < 2:
            return self.session.run([self.output], text_feed(ids, self.inputs) | self.extra)[0]
        ids = ids.reshape(1, -1)
        split = ids.shape[1] // 2
        presents = [spec.present for spec in self.inputs if spec.present is not None]
        first = text_feed(ids[:, :split], self.inputs) | self.extra
        outputs = dict(zip([self.output, *presents], self.session.run([self.output, *presents], first)))
        second = next_step_feed(first, outputs, ids[:, split:], split, self.inputs) | self.extra
        return np.concatenate([outputs[self.output], self.session.run([self.output], second)[0]], axis=1)


def paragraph_chunks(tokenizer, text: str, max_len: int) -> tuple[list[np.ndarray], int]:
    """Token windows covering a paragraph, each overlapping the previous by one token, so that every token after
    the first is predicted exactly once; and the number of characters those predicted tokens cover."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = list(encoding.ids), list(encoding.offsets)
    bos = bos_id(tokenizer)
    if bos is not None:
        ids = [bos, *ids]
        chars = len(text)  # with BOS in front every character's token is predicted
    else:
        chars = len(text) - (offsets[0][1] if offsets else 0)
    chunks = [np.array(ids[start : start + max_len], dtype=np.int64) for start in range(0, max(len(ids) - 1, 1), max_len - 1)]
    return [c for c in chunks if len(c) >= 2], chars


def score_paragraph(model: Runner, baseline: Runner | None, tokenizer, text: str, max_len: int) -> dict:
    chunks, chars = paragraph_chunks(tokenizer, text, max_len)
    row = {"nll_bits": 0.0, "chars": float(chars), "tokens": 0.0}
    if baseline is not None:
        row |= {"base_nll_bits": 0.0, "kl_nats": 0.0, "top1_same": 0.0}
    for ids in chunks:
        targets = ids[1:]
        logp = log_softmax(model.run(ids)[0, :-1])
        row["nll_bits"] += float(-logp[np.arange(len(targets)), targets].sum() / LN2)
        row["tokens"] += len(targets)
        if baseline is not None:
            base = log_softmax(baseline.run(ids)[0, :-1])
            row["base_nll_bits"] += float(-base[np.arange(len(targets)), targets].sum() / LN2)
            row["kl_nats"] += float((np.exp(base) * (base - logp)).sum())
            row["top1_same"] += float((base.argmax(-1) == logp.argmax(-1)).sum())
    return row


def _label_logprob(model: Runner, tokenizer, prompt_ids: list[int], label: str) -> float:
    label_ids = tokenizer.encode(label, add_special_tokens=False).ids
    ids = np.array(prompt_ids + label_ids, dtype=np.int64)
    logp = log_softmax(model.run(ids)[0])
    start = len(prompt_ids)
    return float(sum(logp[start - 1 + i, t] for i, t in enumerate(label_ids)))


def predict_review(model: Runner, tokenizer, text: str, max_len: int) -> int:
    """A classifier's argmax, or a decoder's more likely label word."""
    if _is_classifier(model):
        ids = np.array(tokenizer.encode(text).ids[:max_len], dtype=np.int64)
        return int(np.argmax(model.run(ids)[0]))
    bos = bos_id(tokenizer)
    prompt = tokenizer.encode(REVIEW_PROMPT.format(text=text), add_special_tokens=False).ids
    prompt = ([bos] if bos is not None else []) + prompt[-(max_len - 4):]
    scores = [_label_logprob(model, tokenizer, prompt, label) for label in REVIEW_LABELS]
    return int(np.argmax(scores))


def _is_classifier(model: Runner) -> bool:
    output = next(o for o in model.session.get_outputs() if o.name == model.output)
    return len(output.shape) == 2


def score_review(model: Runner, baseline: Runner | None, tokenizer, record: tuple[str, int], max_len: int) -> dict:
    text, label = record
    row = {"correct": float(predict_review(model, tokenizer, text, max_len) == label)}
    if baseline is not None:
        row["base_correct"] = float(predict_review(baseline, tokenizer, text, max_len) == label)
    return row


def score_sentence(model: Runner, baseline: Runner | None, tokenizer, text: str, max_len: int) -> dict:
    if baseline is None:
        raise QtcError("minilm-sts compares embeddings with a baseline: pass --baseline FLOAT_MODEL")
    ids = np.array(tokenizer.encode(text).ids[:max_len], dtype=np.int64)
    a, b = model.run(ids).ravel().astype(np.float64), baseline.run(ids).ravel().astype(np.float64)
    return {"cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}


@dataclass(frozen=True)
class Task:
    name: str
    workload: str
    split: str
    output: str
    needs_baseline: bool
    score: Callable
    units: Callable  # workload -> list of units
    description: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("zh-news-ppl", "zh-news", "eval", "logits", False, score_paragraph,
             lambda w: w.texts("eval"), "bits/char and perplexity on held-out People's Daily paragraphs"),
        Task("zh-reviews-acc", "zh-reviews", "eval", "logits", False, score_review,
             lambda w: w.records("eval"), "sentiment accuracy on held-out reviews"),
        Task("minilm-sts", "zh-news", "eval", "sentence_embedding", True, score_sentence,
             lambda w: w.texts("eval"), "sentence-embedding cosine to the baseline on held-out news"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise QtcError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})")
    return TASKS[name]
