"""Budget-gated layer skipping: calibrated skip tables, and `If` gates driven by a run-time `budget` input.

Order (see pipeline.py): after the flat graph is calibrated and quantized,
1. `DiscoverBranchesPass` finds the residual branches (qtc.core.blocks);
2. `ScoreBranchesPass` scores them on calibration windows and chooses a skip table: for each budget level, which
   branches to skip so that what is kept (branches, or their weight multiply-adds per token) is at most `budget`
   of the whole. The scoring model is the flat graph with each branch's contribution multiplied by a `keep` input
   (1 = run, 0 = skipped): one session, any mask, no re-export. x + 0 * y is exactly x, so a masked run is
   what a skipped run computes. It also re-checks the calibrated activation ranges under each level's mask
   (skipping upstream branches shifts downstream activations) and builds the static one-shot ShortGPT table
   (whole blocks by Block Influence) that `qtc sweep` measures as the baseline;
3. `InsertLayerSkipPass` moves each branch into an `If`: then = skip (the stream passes through), else = the
   branch as compiled. The condition is row `level(budget)` of the [levels x branches] table; `budget` is a
   scalar float input whose initializer default 1.0 is the dense model, and the table (`qtc_skip_table`) is an
   input whose default is the calibrated table.

Metrics: `bi` (ShortGPT Block Influence 1 - E[cos(x_in, x_out)] over tokens, per branch), `angular` (Gromov
et al.: arccos(cos)/pi, averaged over tokens rather than only the last one), `loss` (SLEB-style greedy: skip
the branch whose removal raises the calibration windows' next-token loss least per unit of compute, re-score,
repeat, with the loss measured as KL(dense || skipped) per token; levels share scores but not choices, so
tables need not be nested).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qtc.backends.base import Backend
from qtc.calibration.data import CalibrationSet, model_inputs, token_input
from qtc.core.blocks import Branch, blocks, find_branches, summary
from qtc.errors import QtcError
from qtc.passes.meta import BRANCHES, SKIP_PLAN, warn
from qtc.util.arrays import log_softmax
from qtc.util.progress import progress_bar

METRICS = ("bi", "angular", "loss")
UNITS = ("branches", "compute")
DEFAULT_BUDGETS = (1.0, 0.9, 0.8, 0.7)
BUDGET_INPUT = "budget"
TABLE = "qtc_skip_table"
LEVELS = "qtc_budget_levels"
KEEP_INPUT = "qtc_keep"
LOSS_WINDOWS = 16  # greedy re-scoring runs the model once per candidate: a few windows keep it affordable
LOSS_CANDIDATES = 12  # and re-scores only the branches with the lowest Block Influence among those left


@dataclass(frozen=True)
class LayerSkipSpec:
    """What `--layer-skip` asks for: budget levels, what they count, and the scoring metric.

    unit `branches`: a budget is the fraction of residual branches run (layer sparsity as L2A and ShortGPT
    count it); `compute`: the fraction of branch weight multiply-adds per token run (attention scores, which grow
    with the sequence, are not counted)."""

    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    metric: str = "loss"
    unit: str = "branches"
    loss_windows: int = LOSS_WINDOWS
    loss_candidates: int = LOSS_CANDIDATES
    # A model already compiled with --layer-skip whose calibrated table this one reuses (e.g. the float build's
    # table for its quantized builds): the greedy loss search, the costly part, runs once per model family.
    table_from: Path | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise QtcError(f"--budget-unit must be one of {', '.join(UNITS)} (got {self.unit!r})")
        if self.metric not in METRICS:
            raise QtcError(f"--skip-metric must be one of {', '.join(METRICS)} (got {self.metric!r})")
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise QtcError(f"--budgets must be numbers in (0, 1] (got {','.join(map(str, self.budgets))})")
        if len(set(self.budgets)) != len(self.budgets):
            raise QtcError("--budgets must not repeat a level")
        if self.loss_windows < 1 or self.loss_candidates < 1:
            raise QtcError("loss_windows and loss_candidates must be >= 1")

    @property
    def levels(self) -> tuple[float, ...]:
        """Descending, always starting at 1.0 (dense), so that the default budget runs every branch."""
        return tuple(sorted(set(self.budgets) | {1.0}, reverse=True))


# ------------------------------------------------------------------------------------------ skip tables


def level_of(levels: tuple[float, ...], budget: float) -> int:
    """Index of the largest level <= budget (levels descending); below the lowest level, the lowest."""
    return min(sum(1 for level in levels if level > np.float32(budget)), len(levels) - 1)


def unit_costs(branches: list[Branch], unit: str) -> list[float]:
    """What each branch counts against a budget: one branch, or its weight multiply-adds per token."""
    return [1.0 if unit == "branches" else float(b.cost) for b in branches]


def _kept_fraction(costs: list[float], skipped: set[int]) -> float:
    return sum(c for i, c in enumerate(costs) if i not in skipped) / sum(costs)


def _skip_lowest(costs: list[float], units: list[list[int]], unit_scores: list[float], budget: float) -> set[int]:
    """One-shot ranking: skip the lowest-scoring units (branches, or whole blocks) until within budget."""
    skipped: set[int] = set()
    for _, unit in sorted(zip(unit_scores, units)):
        if _kept_fraction(costs, skipped) <= budget + 1e-9:
            break
        skipped |= set(unit)
    return skipped


def sparsity(costs: list[float], skipped: set[int]) -> dict:
    """The share of branches skipped, and of their weight multiply-adds (`costs` per branch)."""
    return {"branch_sparsity": len(skipped) / len(costs), "compute_sparsity": 1 - _kept_fraction(costs, skipped)}


def realized(branches: list[Branch], skipped) -> dict:
    return {"skipped_branches": len(skipped), **sparsity(unit_costs(branches, "compute"), set(skipped))}


# ------------------------------------------------------------------------------------------ scoring model


def _constant_node(name: str, array: np.ndarray) -> ir.Node:
    return ir.node("Constant", [], {"value": ir.tensor(array, name=name)}, name=name, outputs=[ir.Value(name=name)])


@contextlib.contextmanager
def masked(model: ir.Model, branches: list[Branch], extra_outputs: list[ir.Value] = ()):
    """The graph with each branch's contribution scaled by `qtc_keep[i]`, and `extra_outputs` exposed; undone
    on exit. Yields the keep input's name."""
    graph = model.graph
    keep = ir.Value(name=KEEP_INPUT, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([len(branches)]))
    graph.inputs.append(keep)
    added, rewired = [], []
    for i, branch in enumerate(branches):
        index = _constant_node(f"qtc_keep_index_{i}", np.array(i, dtype=np.int64))
        factor = ir.node("Gather", [keep, index.outputs[0]], name=f"qtc_keep_{i}", outputs=[ir.Value(name=f"qtc_keep_{i}")])
        scaled = ir.node("Mul", [branch.output, factor.outputs[0]], name=f"qtc_keep_mul_{i}",
                         outputs=[ir.Value(name=f"qtc_keep_mul_{i}", type=branch.output.type)])
        graph.insert_before(branch.add, [index, factor, scaled])
        slot = list(branch.add.inputs).index(branch.output)
        branch.add.replace_input_with(slot, scaled.outputs[0])
        added += [index, factor, scaled]
        rewired.append((branch.add, slot, branch.output))
    existing = set(graph.outputs)
    exposed = [v for v in dict.fromkeys(extra_outputs) if v not in existing]
    graph.outputs.extend(exposed)
    try:
        yield KEEP_INPUT
    finally:
        for _ in exposed:
            graph.outputs.pop()
        for add, slot, value in rewired:
            add.replace_input_with(slot, value)
        graph.remove(added, safe=True)
        graph.inputs.remove(keep)


def _windows(calib: CalibrationSet, model: ir.Model, n: int | None = None) -> list[dict[str, np.ndarray]]:
    feeds = list(calib.feeds(model_inputs(model)))
    return feeds[:n] if n else feeds


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def similarity_scores(model: ir.Model, backend: Backend, calib: CalibrationSet, branches: list[Branch],
                      quiet: bool = False) -> dict[str, list[float]]:
    """Per branch BI and angular distance, and per block BI (block input vs block output), streamed: one pass
    over the calibration windows, keeping only running sums."""
    grouped = list(blocks(branches).values())
    wanted = [b.stream for b in branches] + [b.add.outputs[0] for b in branches]
    sums = {"bi": np.zeros(len(branches)), "angular": np.zeros(len(branches)), "block_bi": np.zeros(len(grouped))}
    tokens = 0
    with masked(model, branches, wanted) as keep:
        session = backend.session(model)
    names = [v.name for v in wanted]
    ones = np.ones(len(branches), dtype=np.float32)
    with progress_bar("layer-skip similarity", total=calib.n_samples, quiet=quiet) as advance:
        for feed in _windows(calib, model):
            got = dict(zip(names, session.run(names, feed | {keep: ones})))
            for i, b in enumerate(branches):
                cos = np.clip(_cosines(got[b.stream.name], got[b.add.outputs[0].name]), -1, 1)
                sums["bi"][i] += (1 - cos).sum()
                sums["angular"][i] += (np.arccos(cos) / np.pi).sum()
            for j, members in enumerate(grouped):
                cos = _cosines(got[members[0].stream.name], got[members[-1].add.outputs[0].name])
                sums["block_bi"][j] += (1 - cos).sum()
            tokens += got[names[0]].reshape(-1, got[names[0]].shape[-1]).shape[0]
            advance()
    return {key: (value / max(tokens, 1)).tolist() for key, value in sums.items()}


class _LossModel:
    """How far the calibration windows' next-token distributions move from the dense model's under a skip set:
    KL(dense || skipped) per token (a distillation loss), memoized by skip set; the next-token NLL is recorded
    beside it. KL rather than NLL: on text the model was trained on, dropping a branch can lower the NLL (it
    forgets a little of what it memorized) while it moves the predictions away from the dense model's, and
    held-out text then pays for it."""

    def __init__(self, session, keep: str, logits: str, tokens: str, feeds: list[dict], n: int):
        self.session, self.keep, self.logits, self.tokens, self.feeds, self.n = session, keep, logits, tokens, feeds, n
        self.cache: dict[frozenset, tuple[float, float]] = {}
        # float16 keeps a large vocabulary's dense log-probabilities affordable; KL sums stay in float64.
        self.dense = [self._logp(feed, frozenset()).astype(np.float16) for feed in feeds]

    def _logp(self, feed: dict, skipped: frozenset) -> np.ndarray:
        mask = np.array([0.0 if i in skipped else 1.0 for i in range(self.n)], dtype=np.float32)
        return log_softmax(self.session.run([self.logits], feed | {self.keep: mask})[0][0, :-1])

    def measure(self, skipped: frozenset) -> tuple[float, float]:
        """(KL nats/token, NLL nats/token)."""
        if skipped not in self.cache:
            kl = nll = count = 0.0
            for feed, dense in zip(self.feeds, self.dense):
                logp = self._logp(feed, skipped)
                targets = feed[self.tokens][0, 1:]
                reference = dense.astype(np.float32)
                kl += float((np.exp(reference) * (reference - logp)).sum(dtype=np.float64))
                nll -= float(logp[np.arange(len(targets)), targets].sum())
                count += len(targets)
            self.cache[skipped] = (kl / count, nll / count)
        return self.cache[skipped]

    def __call__(self, skipped: frozenset) -> float:
        return self.measure(skipped)[0]


def greedy_loss_tables(loss: _LossModel, branches: list[Branch], costs: list[float], levels: tuple[float, ...],
                       prior: list[float], candidates: int = LOSS_CANDIDATES,
                       quiet: bool = False) -> tuple[list[set[int]], list[dict]]:
    """SLEB-style greedy per level: skip the candidate with the smallest loss increase per unit of budget it
    still has to remove (min(cost, what the level needs)), re-score, repeat. The last step of a level prefers
    a branch that just meets the budget, so levels need not be nested. Each step re-scores the `candidates`
    branches left with the lowest `prior` score (Block Influence), which bounds the runs on deep models."""
    costs = [c / sum(costs) for c in costs]
    skips, trace = [], []
    with progress_bar("layer-skip greedy loss", total=len(levels), quiet=quiet) as advance:
        for level in levels:
            skipped: frozenset = frozenset()
            while _kept_fraction(costs, set(skipped)) > level + 1e-9:
                needed = _kept_fraction(costs, set(skipped)) - level
                base = loss(skipped)
                left = sorted((prior[i], i) for i in range(len(branches)) if i not in skipped)[:candidates]
                options = [(((loss(skipped | {i}) - base) / min(costs[i], needed)), i) for _, i in left]
                _, pick = min(options)
                skipped = skipped | {pick}
            skips.append(set(skipped))
            kl, nll = loss.measure(skipped)
            trace.append({"budget": level, "skipped": sorted(branches[i].name for i in skipped),
                          "calibration_kl_per_token": kl, "calibration_nll_per_token": nll})
            advance()
    return skips, trace


# ------------------------------------------------------------------------------------------ range re-check


def _activation_quantizers(graph: ir.Graph) -> list[tuple[ir.Value, float, float]]:
    """Inputs of activation QuantizeLinear nodes with the real interval their scale and zero point represent."""
    found = []
    for node in graph:
        if node.op_type != "QuantizeLinear" or node.inputs[0] is None or node.inputs[0].const_value is not None:
            continue
        scale = node.inputs[1].const_value if node.inputs[1] is not None else None
        zero = node.inputs[2].const_value if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if scale is None or scale.size != 1:
            continue
        z = zero.numpy() if zero is not None else np.zeros((), np.uint8)
        info = np.iinfo(z.dtype)
        s, zp = float(scale.numpy().reshape(())), float(z.reshape(()))
        found.append((node.inputs[0], (info.min - zp) * s, (info.max - zp) * s))
    return found


def range_check(model: ir.Model, backend: Backend, feeds: list[dict], branches: list[Branch], skips: list[set[int]],
                levels: tuple[float, ...], quiet: bool = False) -> list[dict]:
    """Run each level's skip mask and compare every quantized activation's observed range with its calibrated
    (dense) one: how many would clip, and by how much at worst (observed extent / representable extent)."""
    quantizers = _activation_quantizers(model.graph)
    if not quantizers:
        return []
    values = [v for v, _, _ in quantizers]
    with masked(model, branches, values) as keep:
        session = backend.session(model)
    names = [v.name for v in values]
    rows = []
    with progress_bar("layer-skip range check", total=len(levels), quiet=quiet) as advance:
        for level, skipped in zip(levels, skips):
            mask = np.array([0.0 if i in skipped else 1.0 for i in range(len(branches))], dtype=np.float32)
            low, high = np.full(len(names), np.inf), np.full(len(names), -np.inf)
            for feed in feeds:
                for k, array in enumerate(session.run(names, feed | {keep: mask})):
                    low[k], high[k] = min(low[k], float(array.min())), max(high[k], float(array.max()))
            ratios = [max(hi / qhi if qhi > 0 else 1.0, lo / qlo if qlo < 0 else 1.0)
                      for (_, qlo, qhi), lo, hi in zip(quantizers, low, high)]
            worst = int(np.argmax(ratios))
            rows.append({"budget": level, "activations": len(names), "clipping": int(sum(r > 1.0 + 1e-6 for r in ratios)),
                         "worst_ratio": round(float(ratios[worst]), 4), "worst_activation": names[worst]})
            advance()
    return rows


# ------------------------------------------------------------------------------------------ passes


class DiscoverBranchesPass(ir.passes.InPlacePass):
    """Find the residual branches once; later passes read `model.meta[BRANCHES]`. Ensures at least one."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.meta[BRANCHES] = find_branches(model.graph)
        return ir.passes.PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        if not model.meta[BRANCHES]:
            raise QtcError("--layer-skip: no residual branches found in this model (no Add of a stream and a "
                           "weighted branch computed from it)")


def _reused_plan(path: Path, branches: list[Branch], levels: tuple[float, ...]) -> dict:
    """The skip plan (table, metric) of another gated build of the same model, checked by branch name and level."""
    plan = skip_plan(path)
    names = [b.name for b in branches]
    if plan["branches"] != names:
        raise QtcError(f"--skip-table-from {path.name}: its branches differ from this model's "
                       f"({len(plan['branches'])} vs {len(names)}, or other names)")
    if tuple(plan["levels"]) != tuple(levels):
        raise QtcError(f"--skip-table-from {path.name}: its budgets {list(plan['levels'])} differ from {list(levels)}")
    return plan


class ScoreBranchesPass(ir.passes.InPlacePass):
    """Score branches on calibration windows and choose the skip table (qtc's, and the static ShortGPT one)."""

    runs_model = True

    def __init__(self, spec: LayerSkipSpec, calib: CalibrationSet | None, backend: Backend, quiet: bool = False):
        super().__init__()
        self.spec, self.calib, self.backend, self.quiet = spec, calib, backend, quiet

    def requires(self, model: ir.Model) -> None:
        if self.calib is None or self.calib.n_samples == 0 or self.calib.kind != "text":
            raise QtcError("--layer-skip scores branches on calibration text: pass --calib (a corpus or workload)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        branches: list[Branch] = model.meta[BRANCHES]
        levels = self.spec.levels
        scores = similarity_scores(model, self.backend, self.calib, branches, self.quiet)
        feeds = _windows(self.calib, model, self.spec.loss_windows)
        block_members = [[branches.index(b) for b in members] for members in blocks(branches).values()]
        costs = unit_costs(branches, self.spec.unit)
        static = [_skip_lowest(costs, block_members, scores["block_bi"], level) for level in levels]
        trace = None
        reused = _reused_plan(self.spec.table_from, branches, levels) if self.spec.table_from else None
        if reused is not None:
            skips = [{i for i, skipped in enumerate(row) if skipped} for row in reused["table"]]
        elif self.spec.metric == "loss":
            with masked(model, branches) as keep:
                session = self.backend.session(model)
            tokens = token_input(model_inputs(model)).name
            loss = _LossModel(session, keep, model.graph.outputs[0].name, tokens, feeds, len(branches))
            skips, trace = greedy_loss_tables(loss, branches, costs, levels, scores["bi"], self.spec.loss_candidates,
                                              self.quiet)
        else:
            singles = [[i] for i in range(len(branches))]
            skips = [_skip_lowest(costs, singles, scores[self.spec.metric], level) for level in levels]
        checked = range_check(model, self.backend, feeds, branches, skips, levels, self.quiet)
        warn(model, *_range_warnings(checked))
        model.meta[SKIP_PLAN] = {
            "metric": self.spec.metric if reused is None else reused["metric"],
            "unit": self.spec.unit,
            "table_from": None if self.spec.table_from is None else self.spec.table_from.name,
            "budgets": list(levels),
            "branches": summary(branches),
            "scores": {"bi": _round(scores["bi"]), "angular": _round(scores["angular"]),
                       "block_bi": dict(zip(blocks(branches), _round(scores["block_bi"])))},
            "table": [[i in s for i in range(len(branches))] for s in skips],
            "realized": [{"budget": lv} | realized(branches, s) for lv, s in zip(levels, skips)],
            "greedy_trace": trace,
            "loss_windows": len(feeds),
            "loss_candidates": self.spec.loss_candidates if trace is not None else None,
            "static_shortgpt": {"table": [[i in s for i in range(len(branches))] for s in static],
                                "realized": [{"budget": lv} | realized(branches, s) for lv, s in zip(levels, static)]},
            "range_check": checked,
        }
        return ir.passes.PassResult(model, modified=False)


def _range_warnings(checked: list[dict]) -> list[str]:
    """A level that pushes activations past their calibrated ranges more (or further) than the dense model does
    (the dense model itself may exceed float-calibrated ranges a little: upstream quantization noise)."""
    if not checked:
        return []
    dense = checked[0]
    return [f"layer skip at budget {row['budget']:g}: {row['clipping']} of {row['activations']} quantized activations "
            f"exceed their calibrated range (dense: {dense['clipping']}), worst x{row['worst_ratio']:.3g} at "
            f"{row['worst_activation']} (dense: x{dense['worst_ratio']:.3g})" for row in checked[1:]
            if row["clipping"] > dense["clipping"] or row["worst_ratio"] > dense["worst_ratio"] * 1.02]


def _round(values) -> list[float]:
    return [round(float(v), 6) for v in values]


class InsertLayerSkipPass(ir.passes.InPlacePass):
    """Gate every branch with an `If` on row level(budget) of the skip table; add the `budget` input (default 1.0).

    requires: branches and a skip plan; ensures: one If per branch and the budget input with its default.
    """

    def requires(self, model: ir.Model) -> None:
        if BRANCHES not in model.meta or SKIP_PLAN not in model.meta:
            raise ir.passes.PreconditionError("InsertLayerSkipPass needs DiscoverBranchesPass and ScoreBranchesPass")
        if BUDGET_INPUT in {v.name for v in model.graph.inputs}:
            raise QtcError(f"model already has an input named {BUDGET_INPUT!r}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, plan = model.graph, model.meta[SKIP_PLAN]
        branches: list[Branch] = model.meta[BRANCHES]
        row = self._skip_row(graph, plan)
        for i, branch in enumerate(branches):
            _gate(graph, branch, row, i)
        for key, value in sorted(metadata(plan).items()):
            model.metadata_props[key] = value
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _skip_row(graph: ir.Graph, plan: dict) -> ir.Value:
        """row = table[min(count(levels > budget), L-1)]: the skip booleans for the budget's level."""
        budget = ir.Value(name=BUDGET_INPUT, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                          const_value=ir.tensor(np.array(1.0, dtype=np.float32), name=BUDGET_INPUT))
        graph.inputs.append(budget)
        graph.register_initializer(budget)
        levels = np.array(plan["budgets"], dtype=np.float32)
        # The table is an input too, with the calibrated table as its default: a caller (or `qtc sweep`, for the
        # static baseline) may run the same session with another table.
        rows = np.array(plan["table"], dtype=np.bool_)
        table = ir.Value(name=TABLE, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape(list(rows.shape)),
                         const_value=ir.tensor(rows, name=TABLE))
        graph.inputs.append(table)
        graph.register_initializer(table)
        nodes = [
            _constant_node(LEVELS, levels),
            _constant_node("qtc_last_level", np.array(len(levels) - 1, dtype=np.int64)),
        ]
        nodes += [
            ir.node("Greater", [nodes[0].outputs[0], budget], name="qtc_levels_above", outputs=[ir.Value(name="qtc_levels_above")]),
        ]
        nodes += [ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.INT64}, name="qtc_levels_above_count",
                          outputs=[ir.Value(name="qtc_levels_above_int")])]
        nodes += [ir.node("ReduceSum", [nodes[-1].outputs[0]], {"keepdims": 0}, name="qtc_level_raw",
                          outputs=[ir.Value(name="qtc_level_raw")])]
        nodes += [ir.node("Min", [nodes[-1].outputs[0], nodes[1].outputs[0]], name="qtc_level", outputs=[ir.Value(name="qtc_level")])]
        nodes += [ir.node("Gather", [table, nodes[-1].outputs[0]], {"axis": 0}, name="qtc_skip_row",
                          outputs=[ir.Value(name="qtc_skip_row")])]
        for node in nodes:
            graph.append(node)  # before every branch once sorted; TopologicalSortPass runs after
        return nodes[-1].outputs[0]


def _gate(graph: ir.Graph, branch: Branch, row: ir.Value, i: int) -> None:
    """Replace `add` and the branch body with If(skip[i]): then the stream, else stream + branch."""
    add, result = branch.add, branch.add.outputs[0]
    # The stream as it is now: an earlier gate may have replaced the value discovery saw.
    stream = next(v for v in add.inputs if v is not branch.output)
    users, is_output = list(result.uses()), result in graph.outputs
    position = list(graph).index(add)
    anchor = next((n for n in list(graph)[position + 1 :] if n not in branch.body), None)
    graph.remove([*branch.body, add], safe=False)
    name = result.name
    result.name = f"{name}_computed"
    passed = ir.Value(name=f"{name}_skipped", type=stream.type, shape=stream.shape)
    then_branch = ir.Graph([], [passed], nodes=[ir.node("Identity", [stream], name=f"{name}_skip", outputs=[passed])],
                           name=f"{branch.name}.skip")
    else_branch = ir.Graph([], [result], nodes=[*branch.body, add], name=f"{branch.name}.run")
    _move_weights(graph, else_branch)
    index = _constant_node(f"qtc_gate_index_{i}", np.array(i, dtype=np.int64))
    condition = ir.node("Gather", [row, index.outputs[0]], name=f"qtc_gate_{i}", outputs=[ir.Value(name=f"qtc_gate_{i}")])
    gated = ir.Value(name=name, type=result.type, shape=result.shape)
    gate = ir.node("If", [condition.outputs[0]], {"then_branch": then_branch, "else_branch": else_branch},
                   name=f"qtc_gate_{branch.name}", outputs=[gated])
    if anchor is not None:
        graph.insert_before(anchor, [index, condition, gate])
    else:
        graph.extend([index, condition, gate])
    for user, slot in users:
        user.replace_input_with(slot, gated)
    if is_output:
        graph.outputs[list(graph.outputs).index(result)] = gated


def _move_weights(graph: ir.Graph, branch: ir.Graph) -> None:
    """Initializers only the branch reads move into it: ONNX Runtime's QDQ fusions (e.g. DQ + MatMul into
    MatMulNBits) look weights up in the node's own graph, not in the outer scope."""
    inside = set(branch)
    # In node order, not set order: a set of Values iterates by memory address, and the initializer order is bytes.
    read = dict.fromkeys(v for node in branch for v in node.inputs if v is not None and v.is_initializer())
    for value in read:
        if value.name in graph.initializers and all(user in inside for user, _ in value.uses()):
            graph.initializers.pop(value.name)
            branch.register_initializer(value)


def metadata(plan: dict) -> dict[str, str]:
    """metadata_props that let a reader (and `qtc sweep`) see what was skipped at which budget, and why."""
    names = [b["name"] for b in plan["branches"]["list"]]
    return {
        "qtc.layer_skip.metric": plan["metric"],
        "qtc.layer_skip.unit": plan["unit"],
        "qtc.layer_skip.budgets": json.dumps(plan["budgets"]),
        "qtc.layer_skip.branches": json.dumps(names),
        "qtc.layer_skip.weight_elements": json.dumps([b["weight_elements"] for b in plan["branches"]["list"]]),
        "qtc.layer_skip.table": json.dumps(plan["table"]),
        "qtc.layer_skip.static_shortgpt_table": json.dumps(plan["static_shortgpt"]["table"]),
    }


def skip_plan(path: Path) -> dict:
    """The layer-skip metadata of a compiled model: levels, branch names and costs, qtc's and the static table."""
    if not path.is_file():
        raise QtcError(f"model not found: {path}")
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise QtcError(f"{path.name} is not an ONNX model ({type(exc).__name__})") from None
    if "qtc.layer_skip.table" not in props:
        raise QtcError(f"{path.name} has no budget gates: compile it with --layer-skip")
    read = lambda key: json.loads(props[f"qtc.layer_skip.{key}"])  # noqa: E731
    return {"levels": tuple(read("budgets")), "branches": read("branches"), "costs": read("weight_elements"),
            "table": read("table"), "static": read("static_shortgpt_table"), "metric": props["qtc.layer_skip.metric"]}
