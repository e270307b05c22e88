"""Output agreement between two models on the same feeds, computed on a backend's sessions: cosine, max |diff|,
relative error, and for logits top-1 agreement and KL."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx_ir as ir

from qtc.backends.base import Backend
from qtc.calibration.data import model_inputs, prefill_for, resident_rows
from qtc.util.arrays import log_softmax


def session_with_outputs(backend: Backend, model: ir.Model, names: Iterable[str]):
    """A session whose outputs include the named intermediate values: graph outputs are added, then taken back."""
    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    existing = {v.name for v in graph.outputs}
    by_name = {v.name: v for node in graph for v in node.outputs}
    extra = [by_name[n] for n in sorted(set(names)) if n not in existing and n not in inputs and n in by_name]
    graph.outputs.extend(extra)
    try:
        return backend.session(model)
    finally:
        for _ in extra:
            graph.outputs.pop()


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    stats = OutputStats()
    stats.update(reference, candidate, logits=False)
    return stats.result()["cosine"]


class OutputStats:
    """Running agreement statistics for one output, accumulated sample by sample."""

    def __init__(self) -> None:
        self.dot = self.ref_sq = self.out_sq = 0.0
        self.max_abs = 0.0
        self.top1_same = self.top1_total = 0
        self.kl_sum = 0.0
        self.rel = 0.0

    def update(self, ref: np.ndarray, out: np.ndarray, logits: bool) -> None:
        if ref.dtype.kind in "OSU":  # strings (text models): equal or not
            same = ref.shape == out.shape and bool(np.all(ref == out))
            self.dot, self.ref_sq, self.out_sq = self.dot + same, self.ref_sq + 1, self.out_sq + 1
            return
        ref64, out64 = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        self.dot += float(ref64 @ out64)
        self.ref_sq += float(ref64 @ ref64)
        self.out_sq += float(out64 @ out64)
        if ref64.size:
            diff = np.abs(ref64 - out64)
            self.max_abs = max(self.max_abs, float(diff.max()))
            # relative error, robust to near-zero references: the 99.9th percentile, worst sample
            self.rel = max(self.rel, float(np.percentile(diff / np.maximum(np.abs(ref64), 1e-6), 99.9)))
        if logits:
            same = np.argmax(ref, axis=-1) == np.argmax(out, axis=-1)
            self.top1_same += int(same.sum())
            self.top1_total += int(same.size)
            ref_logp, out_logp = log_softmax(ref), log_softmax(out)
            self.kl_sum += float((np.exp(ref_logp) * (ref_logp - out_logp)).sum())

    def result(self) -> dict:
        denominator = np.sqrt(self.ref_sq * self.out_sq)
        data = {"cosine": float(self.dot / denominator) if denominator > 0 else 1.0, "max_abs_diff": self.max_abs,
                "p99.9_rel_diff": self.rel}
        if self.top1_total:
            data["top1_agreement"] = self.top1_same / self.top1_total
            data["kl_per_position"] = self.kl_sum / self.top1_total
            data["positions"] = self.top1_total
        return data


def compare_models(
    backend: Backend,
    reference: str | os.PathLike | bytes | ir.Model,
    candidate: str | os.PathLike | bytes | ir.Model,
    feeds: Iterable[dict[str, np.ndarray]],
) -> dict:
    """Per-output cosine, max |diff| (and top-1 agreement for logits) of candidate against reference.

    The two models never sit in memory together: reference outputs go to a temporary folder first.
    """
    with tempfile.TemporaryDirectory(prefix="qtc-compare-") as folder:
        session = backend.session(reference)
        names = [o.name for o in session.get_outputs()]
        saved = []
        for i, feed in enumerate(feeds):
            path = Path(folder) / f"{i}.npz"
            np.savez(path, **dict(zip(names, session.run(names, feed))))
            saved.append((path, feed))
        del session
        if not saved:
            return {}
        session = backend.session(candidate)
        # a compiled decoder's sliding-window caches take W-row buffers (a windowed one returns the window only)
        specs = model_inputs(candidate) if isinstance(candidate, ir.Model) else []
        windowed = {spec.present: spec for spec in specs if spec.windowed}
        buffered = any(spec.capacity for spec in specs)
        stats = {name: OutputStats() for name in names}
        for path, feed in saved:
            if buffered:
                feed = prefill_for(specs, feed)
            outputs = dict(zip(names, session.run(names, feed)))
            with np.load(path, allow_pickle=True) as reference_outputs:  # our own file; strings are objects
                for name in names:
                    expected, got = reference_outputs[name], outputs[name]
                    if name in windowed:  # the window's rows against the same positions of the full cache
                        got = resident_rows(windowed[name], got, expected.shape[2])
                        expected = expected[:, :, expected.shape[2] - got.shape[2]:]
                    stats[name].update(expected, got, logits="logit" in name)
    return {"samples": len(saved), "outputs": {name: s.result() for name, s in stats.items()}}
