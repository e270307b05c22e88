"""Output agreement between two models on the same feeds, computed on a backend's sessions: cosine, max |diff|,
relative error, and for logits top-1 agreement and KL."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx_ir as ir

from qtc.backends.base import Backend, session_threads, sessions_shared
from qtc.calibration.data import model_inputs, prefill_for, resident_rows
from qtc.util.arrays import high_percentile


def session_with_outputs(backend: Backend, model: ir.Model, names: Iterable[str], only: bool = False):
    """A session whose outputs include the named intermediate values: graph outputs are added, then taken back.

    `only`: its outputs are just the named values, and it runs just the nodes they need (ORT runs every node of a
    graph whatever a run fetches). Calibration then does not pay for outputs it never reads: a decoder's LM head
    and its [S, V] logits are half of gemma-3-270m's forward."""
    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    by_name = {v.name: v for node in graph for v in node.outputs}
    if only:
        wanted = [by_name[n] for n in sorted(set(names)) if n not in inputs and n in by_name]
        with _computing_only(graph, wanted):
            return backend.session(model)
    existing = {v.name for v in graph.outputs}
    extra = [by_name[n] for n in sorted(set(names)) if n not in existing and n not in inputs and n in by_name]
    graph.outputs.extend(extra)
    try:
        return backend.session(model)
    finally:
        for _ in extra:
            graph.outputs.pop()


def _reads(node: ir.Node) -> Iterator[ir.Value]:
    """The values a node reads: its inputs and what its subgraphs (If branches, loop bodies) read from outside."""
    yield from (v for v in node.inputs if v is not None)
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            for subgraph in attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]:
                for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                    yield from (v for v in inner.inputs if v is not None)


def needed_nodes(graph: ir.Graph, values: Iterable[ir.Value]) -> set[ir.Node]:
    """The nodes of `graph` that computing `values` runs."""
    needed: set[ir.Node] = set()
    pending = [v.producer() for v in values]
    while pending:
        node = pending.pop()
        if node is None or node in needed or node.graph is not graph:
            continue
        needed.add(node)
        pending.extend(v.producer() for v in _reads(node))
    return needed


@contextlib.contextmanager
def _computing_only(graph: ir.Graph, outputs: list[ir.Value]):
    """The graph with `outputs` as its outputs and without the nodes and initializers they do not need; put back
    as it was (node and initializer order included: a later save writes the same bytes) however it ends."""
    nodes, initializers, former = list(graph), list(graph.initializers.values()), list(graph.outputs)
    needed = needed_nodes(graph, outputs)
    read = {v for node in needed for v in _reads(node)} | set(outputs)
    graph.remove([node for node in nodes if node not in needed], safe=False)
    for value in initializers:
        if value not in read:
            graph.initializers.pop(value.name)
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    try:
        yield
    finally:
        graph.outputs.clear()
        graph.outputs.extend(former)
        graph.remove(list(graph), safe=False)
        graph.extend(nodes)
        graph.initializers.clear()
        for value in initializers:
            graph.initializers.add(value)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    stats = OutputStats()
    stats.update(reference, candidate, logits=False)
    return stats.result()["cosine"]


# Elements per step of the statistics: 1 MB float32 slices (a 262k-way vocabulary's row), whose dozen passes stay
# in cache where 8 MB slices streamed each pass from memory ([256, 262144] logits: 0.63 -> 0.32 s on arrays alone,
# 0.61 -> 0.53 s per gemma-3-270m held-out window in a compile; the float64 sums move by ~1e-16).
_SLICE = 1 << 18


def _sum64(values: np.ndarray) -> float:
    """A float64 sum of float32 values without a float64 copy (numpy casts a buffer at a time). With the products
    taken in float32 (each rounded by <= 6e-8) a cosine moves by ~1e-10 against all-float64 arithmetic; the float64
    copies and dot products this replaced took 7x as long, most of a held-out comparison's statistics on a
    262k-way vocabulary (2.3x faster statistics on gemma-3-270m's [256, 262144] logits)."""
    return float(np.sum(values, dtype=np.float64))


def _in_threads(work: Callable[[int], tuple], starts: range) -> list[tuple]:
    """work(start) for each start, on the session's thread count (numpy lets go of the GIL in these loops), the
    results in order: the float64 sums then add up as a sequential loop's would, to the bit. The statistics of a
    262k-way vocabulary's logits are otherwise one core's work while the other waits (0.5-1 s per window)."""
    if len(starts) < 2:
        return [work(start) for start in starts]
    with concurrent.futures.ThreadPoolExecutor(session_threads()) as pool:
        return list(pool.map(work, starts))


class OutputStats:
    """Running agreement statistics for one output, accumulated sample by sample."""

    def __init__(self) -> None:
        self.dot = self.ref_sq = self.out_sq = 0.0
        self.max_abs = 0.0
        self.top1_same = self.top1_total = 0
        self.kl_sum = 0.0
        self.rel = 0.0
        # the relative errors' buffer, kept from sample to sample: a fresh [256, 262144] one each window was 268 MB of
        # new pages for the kernel to zero (0.05 s of system time per held-out window)
        self._rel: np.ndarray | None = None

    def update(self, ref: np.ndarray, out: np.ndarray, logits: bool) -> None:
        if ref.dtype.kind in "OSU":  # strings (text models): equal or not
            same = ref.shape == out.shape and bool(np.all(ref == out))
            self.dot, self.ref_sq, self.out_sq = self.dot + same, self.ref_sq + 1, self.out_sq + 1
            return
        # elementwise work in float32 where both are float32 or narrower (sums in float64); integer outputs, whose
        # values float32 may not hold exactly, in float64
        narrow = all(a.dtype.kind == "f" and a.dtype.itemsize <= 4 for a in (ref, out))
        work = np.float32 if narrow else np.float64
        ref_flat, out_flat = ref.reshape(-1), out.reshape(-1)
        if self._rel is None or self._rel.size != ref_flat.size:
            self._rel = np.empty(ref_flat.size, np.float32)
        rel = self._rel

        def sums(start: int) -> tuple[float, float, float, float]:
            r = ref_flat[start:start + _SLICE].astype(work, copy=False)
            o = out_flat[start:start + _SLICE].astype(work, copy=False)
            diff = np.abs(r - o)
            rel[start:start + _SLICE] = diff / np.maximum(np.abs(r), 1e-6)
            return _sum64(r * o), _sum64(r * r), _sum64(o * o), float(diff.max())

        for dot, ref_sq, out_sq, max_abs in _in_threads(sums, range(0, ref_flat.size, _SLICE)):
            self.dot, self.ref_sq, self.out_sq = self.dot + dot, self.ref_sq + ref_sq, self.out_sq + out_sq
            self.max_abs = max(self.max_abs, max_abs)
        if rel.size:  # relative error, robust to near-zero references: the 99.9th percentile, worst sample
            self.rel = max(self.rel, high_percentile(rel, 99.9))
        if logits:
            self._update_logits(ref.reshape(-1, ref.shape[-1]) if ref.ndim else ref.reshape(1, 1),
                                out.reshape(-1, out.shape[-1]) if out.ndim else out.reshape(1, 1), work)

    def _update_logits(self, ref_rows: np.ndarray, out_rows: np.ndarray, work: type) -> None:
        """Top-1 agreement and KL over positions, a block of rows at a time. KL(p || q) per row is
        sum_j p_j (r_j - o_j) - (lse(r) - lse(o)): exponentials in `work`, their sums and the log-sum-exps in float64,
        so no float64 copy of a [rows, 262k] block is made (a float32 exp underflows only below p = 1e-38)."""
        step = max(1, _SLICE // max(ref_rows.shape[1], 1))

        def block(start: int) -> tuple[int, int, float]:
            r = ref_rows[start:start + step].astype(work, copy=False)
            o = out_rows[start:start + step].astype(work, copy=False)
            same = np.argmax(r, axis=-1) == np.argmax(o, axis=-1)
            r_max, o_max = r.max(axis=-1, keepdims=True), o.max(axis=-1, keepdims=True)
            r_exp = np.exp(r - r_max)
            r_total = np.sum(r_exp, axis=-1, dtype=np.float64)
            o_total = np.sum(np.exp(o - o_max), axis=-1, dtype=np.float64)
            r_lse = r_max[:, 0].astype(np.float64) + np.log(r_total)
            o_lse = o_max[:, 0].astype(np.float64) + np.log(o_total)
            expected_gap = np.sum(r_exp * (r - o), axis=-1, dtype=np.float64) / r_total
            return int(same.sum()), int(same.size), float(np.sum(expected_gap - (r_lse - o_lse)))

        for same, total, kl in _in_threads(block, range(0, ref_rows.shape[0], step)):
            self.top1_same, self.top1_total = self.top1_same + same, self.top1_total + total
            self.kl_sum += kl

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

    The two models never sit in memory together: reference outputs go to a temporary folder first. Inside
    `sharing_sessions()` (models that fit side by side) both sessions are open anyway, so each feed runs through
    both and nothing is written.
    """
    if sessions_shared():
        reference_session = backend.session(reference)
        return _compare_runs(backend, candidate, [(feed, reference_session) for feed in feeds], _names(reference_session))
    with tempfile.TemporaryDirectory(prefix="qtc-compare-") as folder:
        session = backend.session(reference)
        names, saved = _names(session), []
        for i, feed in enumerate(feeds):
            path = Path(folder) / f"{i}.npz"
            np.savez(path, **dict(zip(names, session.run(names, feed))))
            saved.append((feed, path))
        del session
        return _compare_runs(backend, candidate, saved, names)


def _names(session) -> list[str]:
    return [o.name for o in session.get_outputs()]


def _reference_outputs(source, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    """The reference's outputs for a feed: a saved .npz (ours; strings are objects) or a live session's run."""
    if isinstance(source, Path):
        with np.load(source, allow_pickle=True) as saved:
            return {name: saved[name] for name in names}
    return dict(zip(names, source.run(names, feed)))


def _compare_runs(backend: Backend, candidate, runs: list[tuple[dict, object]], names: list[str]) -> dict:
    """Run the candidate on each feed and accumulate its agreement with the reference's outputs (each from a
    saved file or a live session)."""
    if not runs:
        return {}
    session = backend.session(candidate)
    # a compiled decoder's sliding-window caches take W-row buffers (a windowed one returns the window only)
    specs = model_inputs(candidate) if isinstance(candidate, ir.Model) else []
    windowed = {spec.present: spec for spec in specs if spec.windowed}
    buffered = any(spec.capacity for spec in specs)
    stats = {name: OutputStats() for name in names}

    def accumulate(expected_outputs: dict, outputs: dict) -> None:
        for name in names:
            expected, got = expected_outputs[name], outputs[name]
            if name in windowed:  # the window's rows against the same positions of the full cache
                got = resident_rows(windowed[name], got, expected.shape[2])
                expected = expected[:, :, expected.shape[2] - got.shape[2]:]
            stats[name].update(expected, got, logits="logit" in name)

    # A sample's statistics (memory-bound passes over its outputs) are taken on a thread while the reference runs
    # the next sample (compute-bound): 8 gemma-3-270m held-out windows 17.0-18.5 -> 14.8-15.3 s. Samples are added
    # in order, one at a time, so the figures are the sequential loop's; the candidate runs once they are done, so
    # three output sets are held at most (a sample's two and the next reference's), not two.
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        pending = None
        for feed, source in runs:
            expected_outputs = _reference_outputs(source, names, feed)
            if pending is not None:
                pending.result()
            pending = worker.submit(accumulate, expected_outputs,
                                    dict(zip(names, session.run(names, prefill_for(specs, feed) if buffered else feed))))
        pending.result()
    return {"samples": len(runs), "outputs": {name: s.result() for name, s in stats.items()}}
