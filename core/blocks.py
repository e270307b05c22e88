"""Block discovery: the repeated transformer blocks and, inside each, the residual branches (attention, MLP).

A residual branch is found by structure, not by name: an `Add(x, y)` of two computed tensors where `y` is
computed from `x` through at least one weighted MatMul/Gemm (`x` is the residual stream, `y` the branch's
contribution). That holds for pre-norm (Llama: x + attn(norm(x))), pre+post-norm (Gemma:
x + post_norm(attn(norm(x)))) and post-norm (BERT: norm(x + attn(x)); the norm sits after the Add and stays
outside the branch). Names only label what structure found: the torch exporter's module path groups branches
into blocks (`model.layers.3`) and tells attention from MLP; without it, a branch holding a Softmax is attention,
and consecutive branches pair into blocks.

A branch's `body` is what a gate may skip: the nodes between `x` and `y`, plus constant-only producers (weight
DequantizeLinear, Transpose of an initializer) used by nothing else, minus anything whose result is read outside
the branch (a KV-cache write, a graph output) and what that needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_ir as ir

from qtc.core.weights import find_weight, module_path

_LAYER = re.compile(r"^(?P<block>.*?[./_]\d+)(?:[./_]|$)")
_ATTENTION_OPS = ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention")


@dataclass
class Branch:
    """One gateable residual branch: `add` computes `stream + output`; `body` computes `output` from `stream`."""

    name: str  # "model.layers.3.attn"
    block: str  # "model.layers.3"
    kind: str  # "attention" | "mlp"
    add: ir.Node
    stream: ir.Value
    output: ir.Value
    body: list[ir.Node]  # in graph order
    cost: int  # weight elements of the MatMul/Gemm/Conv inside: multiply-adds per token

    def describe(self) -> dict:
        return {"name": self.name, "block": self.block, "kind": self.kind, "residual_add": self.add.name,
                "nodes": len(self.body), "weight_elements": self.cost}


def _ancestors(value: ir.Value, stop: ir.Value) -> set[ir.Node]:
    """Nodes `value` is computed from, not looking past `stop`."""
    seen: set[ir.Node] = set()
    todo = [value]
    while todo:
        v = todo.pop()
        node = v.producer() if v is not stop else None
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(i for i in node.inputs if i is not None)
    return seen


def _descendants(value: ir.Value, within: set[ir.Node]) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    todo = [value]
    while todo:
        v = todo.pop()
        for user, _ in v.uses():
            if user in within and user not in seen:
                seen.add(user)
                todo.extend(user.outputs)
    return seen


def _computed(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is None and not value.is_initializer()


def _constant_only(node: ir.Node) -> bool:
    return all(v is None or v.const_value is not None or v.is_initializer() for v in node.inputs)


def _body(graph: ir.Graph, add: ir.Node, x: ir.Value, y: ir.Value, residual_adds: set[ir.Node],
          order: dict[ir.Node, int]) -> list[ir.Node] | None:
    """Nodes computing y from x that only the branch reads; None when y is not computed from x that way.

    A path from x to y through an earlier residual Add is not a branch: an attention mask reaches every later
    layer's scores through the residual stream, yet `scores + mask` is no residual connection.
    """
    body = _descendants(x, _ancestors(y, stop=x))
    if body & residual_adds:
        return None
    # Results read outside the branch (a KV-cache write, a graph output, a later layer reading an earlier one's
    # value) are always computed, with what they need; repeat until nothing in the body is read from outside.
    outputs = set(graph.outputs)
    while True:
        escaping = [n for n in body if any(v in outputs or any(u not in body and u is not add for u, _ in v.uses())
                                           for v in n.outputs)]
        if not escaping:
            break
        for node in escaping:
            body -= {node} | {a for v in node.inputs if v is not None for a in _ancestors(v, stop=x)}
    if y.producer() not in body:
        return None
    # Constant-only producers (weight DQ, Transpose of a weight) move in with the MatMul that reads them, so the
    # runtime can still fuse DQ + MatMul inside the gate.
    changed = True
    while changed:
        changed = False
        for node in {v.producer() for n in body for v in n.inputs if v is not None and v.producer() is not None} - body:
            if _constant_only(node) and all(user in body for v in node.outputs for user, _ in v.uses()):
                body.add(node)
                changed = True
    return sorted(body, key=order.__getitem__)


def _weight_elements(node: ir.Node) -> int:
    """Multiply-adds per token of a weighted node, float or already quantized (weight behind a DequantizeLinear,
    or packed in a MatMulNBits)."""
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("K", 0) * node.attributes.get_int("N", 0)
    found = find_weight(node)
    if found is not None:
        return found.value.const_value.size
    if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.inputs) > 1 and node.inputs[1] is not None:
        producer = node.inputs[1].producer()
        while producer is not None and producer.op_type in ("Transpose", "Reshape", "DequantizeLinear"):
            weight = producer.inputs[0]
            if weight is not None and weight.const_value is not None:
                return weight.const_value.size
            producer = weight.producer() if weight is not None else None
    return 0


def _kind(body: list[ir.Node]) -> str:
    """Attention mixes positions (a Softmax or a fused attention op); an MLP does not."""
    return "attention" if any(n.op_type in _ATTENTION_OPS for n in body) else "mlp"


def _block_name(add: ir.Node, body: list[ir.Node]) -> str | None:
    """The repeated module holding the branch, e.g. `model.layers.3`, from the exporter's module paths."""
    for path in [module_path(add), *(module_path(n) for n in body)]:
        match = _LAYER.match(path)
        if match:
            return match["block"]
    return None


def find_branches(graph: ir.Graph) -> list[Branch]:
    """Every residual branch of the top-level graph, in graph order, grouped into blocks and labelled."""
    found = []
    order = {node: i for i, node in enumerate(graph)}  # once, not per candidate Add
    for add in graph:
        if add.op_type != "Add" or len(add.inputs) != 2 or not all(_computed(v) for v in add.inputs):
            continue
        for x, y in (add.inputs, add.inputs[::-1]):
            body = _body(graph, add, x, y, {b.add for b in found}, order)
            cost = sum(_weight_elements(n) for n in body) if body else 0
            if cost:
                found.append(Branch("", _block_name(add, body) or "", _kind(body), add, x, y, body, cost))
                break
    return _label(found)


def _label(branches: list[Branch]) -> list[Branch]:
    """Blocks from module paths where every branch has one; else consecutive branches pair into blocks."""
    if not branches or any(not b.block for b in branches):
        for i, branch in enumerate(branches):
            branch.block = f"block.{i // 2}"
    counts: dict[tuple[str, str], int] = {}
    for branch in branches:
        key = (branch.block, branch.kind)
        counts[key] = counts.get(key, 0) + 1
        suffix = "attn" if branch.kind == "attention" else "mlp"
        branch.name = f"{branch.block}.{suffix}" + (f"{counts[key]}" if counts[key] > 1 else "")
    return branches


def blocks(branches: list[Branch]) -> dict[str, list[Branch]]:
    grouped: dict[str, list[Branch]] = {}
    for branch in branches:
        grouped.setdefault(branch.block, []).append(branch)
    return grouped


def summary(branches: list[Branch]) -> dict:
    """What `qtc inspect` shows: blocks, their branches, and each branch's share of the branch compute."""
    total = sum(b.cost for b in branches) or 1
    return {
        "blocks": len(blocks(branches)),
        "branches": len(branches),
        "by_kind": {kind: sum(1 for b in branches if b.kind == kind) for kind in sorted({b.kind for b in branches})},
        "list": [b.describe() | {"cost_fraction": round(b.cost / total, 6)} for b in branches],
    }
