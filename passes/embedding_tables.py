"""Quantized embedding tables on ORT's CPU kernels: one packed table for the lookup and a tied LM head.

`InsertQDQPass` writes the portable form: the table as int4/int8 blocks along hidden, one DequantizeLinear
(axis 1, block_size B), read by the Gather and, in a tied model, by Transpose -> MatMul (the head). ORT runs that
form correctly but dequantizes the whole table on every run (Gemma: 168 M floats) and fuses neither reader.
These rules rewrite both readers onto com.microsoft kernels that read the blocks directly:

- Gather -> GatherBlockQuantized(table, ids, scales, quantize_axis 2) and a Reshape back to [..., hidden];
- Transpose -> MatMul -> MatMulNBits(x, table, scales): MatMulNBits wants B as [N, K / B, B * bits / 8] blocked
  along K, and the table [vocab, hidden] is exactly [N, K] blocked along K, so the head needs no transposition.

Both read the same uint8 initializer (signed values + 2^(bits-1): the kernels' default zero point, so symmetric
grids need none) and the same scales: the table is stored once. An asymmetric table (a zero point per block: a
4-bit LM head loses much less that way, gemma-3-270m +0.28 vs +0.42 bits/char) also gives each kernel its zero
points, in the layout that kernel reads. Tables whose hidden size is a whole number of power-of-two blocks
qualify; anything else keeps the portable DequantizeLinear form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from qtc.core.ops import MS_DOMAIN
from qtc.passes.meta import ANNOTATION, FUSED_TABLES, ROLE, warn
from qtc.util.spill import release, spill

BITS = {ir.DataType.INT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT4: 4, ir.DataType.UINT8: 8}
UNSIGNED = {ir.DataType.UINT4, ir.DataType.UINT8}
INT8_GEMM_LEVEL = 4
EIGHT_BIT_NOTE = ("8-bit block weights run at accuracy_level 4 (int8 activations per block, an int8 GEMM): at a "
                  "lower level ORT 1.32 dequantizes the whole 8-bit weight on every call (a gemma-3-270m w4a16 "
                  "decoder, whose tied LM head reads the int8 table, decodes 1.3 tokens/s at level 1, 46.5 at "
                  "level 4)")


def pack_blocks(q: np.ndarray, bits: int, block_size: int, signed: bool = True) -> np.ndarray:
    """[N, K] integers as the kernels' uint8 blobs [N, K / block, block * bits / 8] (low nibble first): signed
    values + 2^(bits-1) (the kernels' default zero point), unsigned ones as they are (they come with zero points)."""
    n, k = q.shape
    offset = q.astype(np.int16) + ((1 << (bits - 1)) if signed else 0)
    if bits == 8:
        return offset.astype(np.uint8).reshape(n, k // block_size, block_size)
    pairs = offset.astype(np.uint8).reshape(n, k // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(n, k // block_size, block_size // 2)


def pack_zero_points(z: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [N, blocks] as MatMulNBits reads them: uint8 [N, ceil(blocks * bits / 8)], low nibble first."""
    z = np.asarray(z, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(z)
    if z.shape[1] % 2:
        z = np.pad(z, ((0, 0), (0, 1)))
    return np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4))


PACK_ROWS = 4096  # rows packed per step: an LM head of 151,936 rows never has its int16 copy made at once


def pack_rows(q: np.ndarray, bits: int, block_size: int, transpose: bool = False, signed: bool = True) -> np.ndarray:
    """pack_blocks of the signed integers `q` [N, K] (or of q.T when `transpose`, q being [K, N]), PACK_ROWS
    output rows at a time into one array, a last partial block zero-padded: the transient memory is a few MB per
    step instead of the ~4 copies of the whole tensor packing it at once costs (qwen2.5-coder-1.5b's int8 head:
    233 MB of values, ~1 GB transient)."""
    rows, k = (q.shape[1], q.shape[0]) if transpose else q.shape
    width = k + (-k % block_size)
    out = np.empty((rows, width // block_size, block_size * bits // 8), dtype=np.uint8)
    for start in range(0, rows, PACK_ROWS):
        part = q[:, start : start + PACK_ROWS].T if transpose else q[start : start + PACK_ROWS]
        part = np.asarray(part, dtype=np.int8 if signed else np.uint8)
        if width != k:  # zeros, which the kernels never read
            part = np.pad(part, ((0, 0), (0, width - k)))
        out[start : start + PACK_ROWS] = pack_blocks(np.ascontiguousarray(part), bits, block_size, signed)
    return out


class PackedTables:
    """The packed copy of each quantized table, made once and shared by every rule that reads it."""

    def __init__(self) -> None:
        self.values: dict[str, ir.Value] = {}

    def get(self, op, table: ir.Value, block_size: int) -> ir.Value:
        if table.name not in self.values:
            dtype = table.const_value.dtype
            packed = pack_rows(table.const_value.numpy(), BITS[dtype], block_size, signed=dtype not in UNSIGNED)
            release(table.const_value)
            name = table.name.removesuffix("_quantized") + "_blocks"
            self.values[table.name] = op.initializer(spill(ir.tensor(packed, name=name)), name=name)
        return self.values[table.name]

    def zero_points(self, op, dq: ir.Value, per_block_byte: bool) -> ir.Value | None:
        """A table's zero points as a kernel reads them (stored values shifted as pack_blocks shifts them), or
        None where the kernels' default fits (signed, symmetric). GatherBlockQuantized over the [vocab, blocks,
        block * bits / 8] blob wants them shaped like its scales, [vocab, blocks, 1], packed along that last axis
        (one per byte); MatMulNBits wants [vocab, ceil(blocks * bits / 8)] (two 4-bit ones a byte, low first)."""
        node = _dequantize_node(dq)
        table, scale = node.inputs[0].const_value, node.inputs[1].const_value
        zero = node.inputs[2] if len(node.inputs) > 2 else None
        signed = table.dtype not in UNSIGNED
        if zero is None and signed:
            return None
        key = f"{node.inputs[0].name}_zero_points{'_gather' if per_block_byte else ''}"
        if key not in self.values:
            bits = BITS[table.dtype]
            z = zero.const_value.numpy().astype(np.int16) if zero is not None else np.zeros(scale.shape.numpy(), np.int16)
            z = (z + ((1 << (bits - 1)) if signed else 0)).astype(np.uint8)
            packed = z[..., None] if per_block_byte else pack_zero_points(z, bits)
            self.values[key] = op.initializer(ir.tensor(np.ascontiguousarray(packed), name=key), name=key)
        return self.values[key]


def _dequantize_node(dq: ir.Value) -> ir.Node:
    return dq.producer()


def carry_annotation(old: ir.Node, new: ir.Value) -> ir.Value:
    """The fused node stands for the annotated one in the report (what was quantized, which role)."""
    for key in (ANNOTATION, ROLE):
        if key in old.meta:
            new.producer().meta[key] = old.meta[key]
    return new


def check_blocks(dq: ir.Value, tensor_value: ir.Value, scale: ir.Value, axis: int, what: str,
                 zero_points: bool = False) -> MatchResult:
    """A block-quantized 2-D tensor as the block kernels read it: integers and scales constant, blocks of a
    power-of-two size >= 16 along `axis` (a last partial block allowed); int4/int8 with no zero point (symmetric),
    or, where the caller writes `zero_points`, uint4/uint8 with a constant one per block (asymmetric)."""
    result = MatchResult()
    node = _dequantize_node(dq)
    tensor, scales = tensor_value.const_value, scale.const_value
    if tensor is None or scales is None:
        return result.fail(f"{what} or scale is not a constant")
    if tensor.dtype not in BITS or tensor.shape.rank() != 2:
        return result.fail(f"{what} is {tensor.dtype} of rank {tensor.shape.rank()}, not 2-D (u)int4 / (u)int8")
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if not zero_points and (zero is not None or tensor.dtype in UNSIGNED):
        return result.fail(f"{what} has a zero point (asymmetric, or {tensor.dtype}); this kernel form is written "
                           "without one, and the kernels' default would differ")
    block = node.attributes.get_int("block_size", 0)
    if node.attributes.get_int("axis", 1) != axis or block < 16 or block & (block - 1):
        return result.fail(f"blocks must run along axis {axis} with a power-of-two size >= 16 (block_size {block})")
    shape = list(tensor.shape.numpy())
    shape[axis] = -(-shape[axis] // block)
    if scales.dtype != ir.DataType.FLOAT or list(scales.shape.numpy()) != shape:
        return result.fail(f"scales are not float32 {shape} (one per block)")
    if zero is not None and (zero.const_value is None or list(zero.const_value.shape.numpy()) != shape):
        return result.fail(f"zero points are not constant {shape} (one per block)")
    return result


def check_table(dq: ir.Value, table: ir.Value, scale: ir.Value) -> MatchResult:
    """A table [vocab, hidden] blocked along hidden: also a whole number of blocks (GatherBlockQuantized)."""
    result = check_blocks(dq, table, scale, 1, "table", zero_points=True)
    block = _dequantize_node(dq).attributes.get_int("block_size", 0)
    if result and table.const_value.shape[1] % block:
        return result.fail(f"hidden size {table.const_value.shape[1]} is not a whole number of blocks of {block}")
    return result


class GatherBlockQuantizedRule(pattern.RewriteRuleClassBase):
    """DequantizeLinear(table) -> Gather(ids) becomes GatherBlockQuantized on the packed table."""

    def __init__(self, tables: PackedTables) -> None:
        super().__init__(remove_nodes=False)  # the DequantizeLinear may still feed the head; cleanup drops it
        self.tables = tables

    def pattern(self, op, table, scale, ids):
        return op.Gather(op.DequantizeLinear(table, scale, _allow_other_inputs=True, _outputs=["dq"]), ids, _outputs=["rows"])

    def check(self, context, table, scale, ids, dq, rows, **_) -> MatchResult:
        result = check_table(dq, table, scale)
        if not result:
            return result
        if rows.producer().attributes.get_int("axis", 0) != 0:
            return result.fail("Gather is not along axis 0 (rows of the table)")
        if ids.shape is None:
            return result.fail("the rank of the indices is unknown (needed to reshape the rows back)")
        return result

    def rewrite(self, op, table, scale, ids, dq, rows, **_):
        block = _dequantize_node(dq).attributes.get_int("block_size")
        n, k = table.const_value.shape.numpy()
        scale_3d = op.Reshape(scale, op.Constant(value_ints=[n, k // block, 1]))
        zero = self.tables.zero_points(op, dq, per_block_byte=True)
        blocks = carry_annotation(rows.producer(), op.GatherBlockQuantized(
            self.tables.get(op, table, block), ids, scale_3d, *([zero] if zero is not None else []), _domain=MS_DOMAIN,
            gather_axis=0, quantize_axis=2, block_size=block, bits=BITS[table.const_value.dtype]))
        # [..., K / block, block] -> [..., K]; 0 keeps each index dimension as it is
        return op.Reshape(blocks, op.Constant(value_ints=[0] * ids.shape.rank() + [k]))


class TiedHeadMatMulNBitsRule(pattern.RewriteRuleClassBase):
    """MatMul(x, Transpose(DequantizeLinear(table))) becomes MatMulNBits on the same packed table, weight-only."""

    def __init__(self, tables: PackedTables, accuracy_level: int) -> None:
        super().__init__(remove_nodes=False)
        self.tables, self.accuracy_level = tables, accuracy_level

    def pattern(self, op, x, table, scale):
        transposed = op.Transpose(op.DequantizeLinear(table, scale, _allow_other_inputs=True, _outputs=["dq"]), _outputs=["transposed"])
        return op.MatMul(x, transposed, _outputs=["product"])

    def check(self, context, x, table, scale, dq, transposed, **_) -> MatchResult:
        result = check_table(dq, table, scale)
        if not result:
            return result
        if list(transposed.producer().attributes.get_ints("perm", [1, 0])) != [1, 0]:
            return result.fail("Transpose is not a plain 2-D transposition")
        if x.dtype != ir.DataType.FLOAT:
            return result.fail(f"activation is {x.dtype}, MatMulNBits here takes float32 (as its scales)")
        return result

    def rewrite(self, op, x, table, scale, dq, product, **_):
        block = _dequantize_node(dq).attributes.get_int("block_size")
        n, k = table.const_value.shape.numpy()
        bits = BITS[table.const_value.dtype]
        # 4 bits: the recipe's level for its block layers (1, float, where they run in float; 4, int8 activations
        # per block, where they do: the head then decodes as fast as the ORT GenAI builder's); 8 bits: EIGHT_BIT_NOTE
        zero = self.tables.zero_points(op, dq, per_block_byte=False)
        return carry_annotation(product.producer(), op.MatMulNBits(
            x, self.tables.get(op, table, block), scale, *([zero] if zero is not None else []), _domain=MS_DOMAIN,
            K=int(k), N=int(n),
            bits=bits, block_size=block, accuracy_level=INT8_GEMM_LEVEL if bits == 8 else self.accuracy_level))


class FuseQuantizedTablesPass(ir.passes.InPlacePass):
    """Requires InsertQDQPass's portable table form; rewrites its readers onto ORT's block kernels (see module).
    `accuracy_level`: the recipe's for block-int4 layers (None: it has none); a 4-bit tied head runs at it (at
    least 1: float activations)."""

    def __init__(self, accuracy_level: int | None = None) -> None:
        super().__init__()
        self.head_level = max(1, accuracy_level or 0)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        tables = PackedTables()
        rules = pattern.RewriteRuleSet([GatherBlockQuantizedRule.rule(tables),
                                        TiedHeadMatMulNBitsRule.rule(tables, self.head_level)])
        count = rules.apply_to_model(model)
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        model.meta[FUSED_TABLES] = count
        if any(node.op_type == "MatMulNBits" and node.attributes.get_int("bits", 4) == 8 for node in model.graph.all_nodes()):
            warn(model, f"the tied LM head: {EIGHT_BIT_NOTE}")
        if self.head_level >= INT8_GEMM_LEVEL and any(node.op_type == "MatMulNBits" and node.attributes.get_int("bits", 4) == 4
                                                     for node in model.graph.all_nodes()):
            warn(model, f"the tied LM head (4-bit table) runs at accuracy_level {self.head_level}, int8 activations per "
                        "block, as the recipe's block layers do")
        return ir.passes.PassResult(model, modified=bool(count))
