"""Rotations (recipe `rotate: hadamard`): an orthogonal change of basis of the residual stream, folded into the
weights, so that 8-bit per-tensor activations stop paying for a few outlier channels (QuaRot, SpinQuant; in Quark,
Olive, llm-compressor and msModelSlim). The float model computes the same function.

For a pre-norm decoder (Llama / Qwen2: x += f(RMSNorm(x) gamma), RMSNorm(x) = x / rms(x)) and an orthogonal Q:
  - RMSNorm commutes with Q once gamma is out of it (rms(x Q) = rms(x)), so each norm's gamma is first folded into
    the rows of the weights reading it (W <- diag(gamma) W) and set to ones;
  - the stream becomes x Q: embedding rows E <- E Q; every weight reading a norm W <- Q^T W; every weight writing
    into the stream W <- W Q (its bias b <- b Q); a tied LM head is untied (it reads diag(gamma) Q^T E^T).
  - online, only where it is needed: the MLP's down projection reads the SwiGLU product, whose outliers no
    residual rotation reaches; a block-diagonal Hadamard H (blocks of the largest power of two dividing its width,
    at most 256) is applied to that activation at run time and folded into the weight (W <- H W, H symmetric and
    orthogonal). That MatMul stays float (role `rotation`).
Q is a randomized Hadamard: diag(s) (H_2^k / sqrt(2^k) kron R_m) for hidden = 2^k m, s random signs and R_m a
random orthogonal m x m (hidden sizes such as 896 = 128 x 7 have no Hadamard matrix of their own); seeded.

Runs on the canonical graph before fusion (the decomposed RMSNorm). Refused, with the reason, where the graph is
not that shape: a norm between a branch and its residual Add (Gemma 3's post-branch norms do not commute with Q),
an already fused norm, a stream value read by anything but a norm or a residual Add.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qtc.errors import QtcError
from qtc.passes.meta import ROLE, ROTATION

_MAX_ONLINE_BLOCK = 256


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _only_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1


@dataclass
class _Norm:
    x: ir.Value  # the stream value normalized
    scale_node: ir.Node  # Mul(gamma, normalized)
    gamma_input: int
    output: ir.Value
    interior: set = field(default_factory=set)  # nodes reading x inside the norm (Pow, Mul(x, r))


def _rms_norm(node: ir.Node) -> _Norm | None:
    """`node` = Mul(gamma, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps))))), either Mul order."""
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    for gamma_input in (0, 1):
        gamma, normed = node.inputs[gamma_input], node.inputs[1 - gamma_input]
        g = _const(gamma)
        inner = normed.producer() if normed is not None else None
        if g is None or g.ndim != 1 or inner is None or inner.op_type != "Mul":
            continue
        for x_input in (0, 1):
            x, r = inner.inputs[x_input], inner.inputs[1 - x_input]
            chain = [r.producer()]
            for op in ("Reciprocal", "Sqrt", "Add", "ReduceMean", "Pow"):
                step = chain[-1]
                if step is None or step.op_type != op:
                    break
                chain.append(step.inputs[0].producer() if op != "Pow" else step)
            else:
                power = chain[-1]
                if power.inputs[0] is x and _const(power.inputs[1]) is not None and float(_const(power.inputs[1]).reshape(-1)[0]) == 2.0:
                    return _Norm(x, node, gamma_input, node.outputs[0], {power, inner})
    return None


def _weight_matmul(node: ir.Node, reads: ir.Value) -> np.ndarray | None:
    """The constant [in, out] weight of MatMul(reads, W), or None."""
    if node.op_type != "MatMul" or node.inputs[0] is not reads:
        return None
    w = _const(node.inputs[1])
    return w if w is not None and w.ndim == 2 else None


def residual_rotation(hidden: int, seed: int = 0) -> np.ndarray:
    """The randomized Hadamard Q [hidden, hidden] described above (float64, orthogonal)."""
    rng = np.random.default_rng(seed)
    power = hidden & -hidden  # largest power of two dividing hidden
    hadamard = _hadamard(power)
    odd = hidden // power
    rest = np.linalg.qr(rng.standard_normal((odd, odd)))[0] if odd > 1 else np.ones((1, 1))
    signs = rng.choice([-1.0, 1.0], size=hidden)
    return signs[:, None] * np.kron(hadamard, rest)


def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


class RotateResidualPass(ir.passes.InPlacePass):
    """Fold a residual-stream rotation into the weights, and an online block Hadamard before each MLP down
    projection; float outputs unchanged. `model.meta[ROTATION]` says what was rotated."""

    def __init__(self, seed: int = 0, online: bool = True) -> None:
        super().__init__()
        self.seed, self.online = seed, online

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(n.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization") for n in graph):
            raise QtcError("rotate: the model's RMSNorms are already fused (SimplifiedLayerNormalization); rotation "
                           "folds each norm's scale into the weights it feeds, which needs the decomposed form")
        embed = _embedding(graph)
        table = _const(embed.inputs[0])
        hidden = table.shape[1]
        norms = [n for n in (_rms_norm(node) for node in graph) if n is not None]
        stream, writers, readers = self._walk(graph, embed, norms, hidden)
        plan = [(norm, [(node, self._tied(node, norm, embed)) for node, _ in norm.output.uses()]) for norm in readers]
        q = residual_rotation(hidden, self.seed)  # every check passed: from here on the weights change
        _set(embed.inputs[0], (table.astype(np.float64) @ q).astype(np.float32))
        for norm, nodes in plan:
            gamma = _const(norm.scale_node.inputs[norm.gamma_input]).astype(np.float64)
            for node, tied in nodes:
                self._rotate_reader(model, node, tied, gamma, q, embed)
            ones = ir.Value(name=f"{norm.scale_node.name or norm.output.name}.gamma_folded",
                            const_value=ir.tensor(np.ones(hidden, np.float32)), shape=ir.Shape([hidden]),
                            type=ir.TensorType(ir.DataType.FLOAT))
            graph.register_initializer(ones)
            norm.scale_node.replace_input_with(norm.gamma_input, ones)
        online = 0
        for node, bias in writers:
            w = _const(node.inputs[1]).astype(np.float64)
            if self.online and node.inputs[0].producer() is not None and node.inputs[0].producer().op_type == "Mul":
                w = self._online_hadamard(graph, node, w)
                online += 1
            _set_input(graph, node, 1, (w @ q).astype(np.float32))
            if bias is not None:
                _set_input(graph, bias[0], bias[1], (_const(bias[0].inputs[bias[1]]).astype(np.float64) @ q).astype(np.float32))
        model.meta[ROTATION] = {"residual": f"randomized Hadamard {hidden} x {hidden} (seed {self.seed})",
                                "norms_folded": len(readers), "writers": len(writers), "online_hadamard": online,
                                "stream_values": len(stream)}
        return ir.passes.PassResult(model, modified=True)

    def _walk(self, graph, embed, norms, hidden):
        """Follow the residual stream from the embedding: each value is read by norms and by one residual Add."""
        start = embed.outputs[0]
        consumers = [u for u, _ in start.uses()]
        if len(consumers) == 1 and consumers[0].op_type == "Mul" and _const(consumers[0].inputs[1]) is not None \
                and _const(consumers[0].inputs[1]).size == 1:
            start = consumers[0].outputs[0]  # Gemma-style embedding scale: a scalar commutes with Q
        by_input = {}
        for norm in norms:
            by_input.setdefault(norm.x, []).append(norm)
        stream, writers, readers, frontier = [], [], [], [start]
        outputs = set(graph.outputs)
        while frontier:
            value = frontier.pop()
            stream.append(value)
            if value in outputs:
                raise QtcError(f"rotate: the residual stream value {value.name!r} is a graph output")
            value_norms = by_input.get(value, [])
            interior = set().union(*(n.interior for n in value_norms)) if value_norms else set()
            readers.extend(value_norms)
            for node, _ in value.uses():
                if node in interior:
                    continue
                if node.op_type != "Add":
                    raise QtcError(f"rotate: the residual stream value {value.name!r} is read by {node.op_type} node "
                                   f"{node.name!r}, which does not commute with a rotation")
                branch = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
                writers.append(self._writer(branch, hidden))
                frontier.append(node.outputs[0])
        if not readers:
            raise QtcError("rotate: no decomposed RMSNorm reads the residual stream (LayerNorm models are not rotated)")
        return stream, writers, readers

    def _writer(self, branch: ir.Value, hidden: int):
        node, bias = branch.producer(), None
        if node is not None and node.op_type == "Add" and _const(node.inputs[1]) is not None:
            bias, node = (node, 1), node.inputs[0].producer()
        if node is None or node.op_type != "MatMul" or _const(node.inputs[1]) is None \
                or _const(node.inputs[1]).shape[-1] != hidden or not _only_use(node.inputs[1]):
            what = f"{node.op_type} node {node.name!r}" if node is not None else "a graph input"
            raise QtcError(f"rotate: a residual branch ends in {what}, not a weight MatMul (a norm after the branch, "
                           "as in Gemma 3, does not commute with a rotation)")
        return node, bias

    @staticmethod
    def _tied(node: ir.Node, norm: _Norm, embed: ir.Node) -> bool:
        """Whether `node` reads the norm through a weight MatMul (False) or the tied head MatMul(x, Transpose(table))
        (True); anything else is refused, before any weight is changed."""
        if _weight_matmul(node, norm.output) is not None:
            if not _only_use(node.inputs[1]):
                raise QtcError(f"rotate: weight {node.inputs[1].name!r} is shared by several nodes")
            return False
        transpose = node.inputs[1].producer() if node.op_type == "MatMul" and node.inputs[0] is norm.output else None
        if transpose is not None and transpose.op_type == "Transpose" and transpose.inputs[0] is embed.inputs[0]:
            return True
        raise QtcError(f"rotate: the norm output {norm.output.name!r} is read by {node.op_type} node {node.name!r}, "
                       "not a weight MatMul")

    def _rotate_reader(self, model, node, tied, gamma, q, embed):
        if tied:  # untie: the head gets its own copy, diag(gamma) Q^T E^T of the original table
            rotated = _const(embed.inputs[0]).astype(np.float64)  # already E Q
            head = (gamma[:, None] * rotated.T).astype(np.float32)
            _set_input(model.graph, node, 1, head, name=f"{node.name or 'lm_head'}.untied_weight")
            return
        w = _const(node.inputs[1]).astype(np.float64)
        _set_input(model.graph, node, 1, (q.T @ (gamma[:, None] * w)).astype(np.float32))

    def _online_hadamard(self, graph, node, w):
        width = w.shape[0]
        block = min(width & -width, _MAX_ONLINE_BLOCK)
        if block < 2:
            return w
        h = _hadamard(block)
        x = node.inputs[0]
        name = f"{node.name or x.name}.online_hadamard"
        split = _initializer(graph, f"{name}.split", np.array([0, 0, width // block, block], np.int64))
        merge = _initializer(graph, f"{name}.merge", np.array([0, 0, width], np.int64))
        matrix = _initializer(graph, f"{name}.matrix", h.astype(np.float32))
        blocks = ir.node("Reshape", [x, split], name=f"{name}/split")
        mixed = ir.node("MatMul", [blocks.outputs[0], matrix], name=f"{name}/MatMul")
        mixed.meta[ROLE] = "rotation"  # stays float: annotate skips it
        back = ir.node("Reshape", [mixed.outputs[0], merge], name=f"{name}/merge")
        graph.insert_before(node, [blocks, mixed, back])
        node.replace_input_with(0, back.outputs[0])
        return np.einsum("cb,kbo->kco", h, w.reshape(width // block, block, -1)).reshape(width, -1)


def _embedding(graph: ir.Graph) -> ir.Node:
    gathers = [n for n in graph if n.op_type == "Gather" and _const(n.inputs[0]) is not None and _const(n.inputs[0]).ndim == 2]
    if len(gathers) != 1:
        raise QtcError(f"rotate: expected one embedding table Gather, found {len(gathers)}")
    return gathers[0]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.FLOAT if array.dtype == np.float32 else ir.DataType.INT64))
    graph.register_initializer(value)
    return value


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)


def _set_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str | None = None) -> None:
    """Replace node input `index` with a new initializer (the old one may have other readers, e.g. a tied table)."""
    old = node.inputs[index]
    if name is None and _only_use(old) and old.is_initializer():
        _set(old, array)
        return
    node.replace_input_with(index, _initializer(graph, name or f"{old.name}.rotated", array))
