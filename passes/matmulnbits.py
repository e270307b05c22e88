"""Block-quantized (int4, int8) weight MatMuls written as com.microsoft::MatMulNBits, with the recipe's accuracy_level fixed in
the node: the numerics are in the graph, not in a session config entry a server never sets.

ORT CPU fuses `DequantizeLinear(int4 blocks) -> MatMul` into MatMulNBits itself, but takes the accuracy level from
`session.qdq_matmulnbits_accuracy_level`, default 4 (int8 activations): onnxruntime-genai or a plain session
would run a w4a16 model as w4a8. Written here, the level is the recipe's: 0 (float activations) for w4a16,
4 (int8 activations per block, quantized at run time) for w4a8 on cpu.

`InsertQDQPass` stores a weight [K, N] (in, out) as int4 blocks along K with scales [K / B, N]; MatMulNBits wants
B as [N, K / B, B / 2] uint8 blobs (low nibble first, value + 8) and scales [N, K / B]: the weight is transposed
once here (a last partial block is padded with zeros; the kernel reads K values). int8 blocks (e.g. an LM head
kept at 8 bits) pack the same way with value + 128; at accuracy_level 0 ORT 1.32 dequantizes 8-bit weights on
every call (slow at decode, bench/weight_kernels.py), at level 4 they run as an int8 GEMM. Only symmetric weights (no zero
point) with power-of-two blocks >= 16 qualify; others keep the DequantizeLinear form, and the rule says why.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from qtc.core.ops import MS_DOMAIN
from qtc.passes.embedding_tables import (
    BITS,
    EIGHT_BIT_NOTE,
    INT8_GEMM_LEVEL,
    carry_annotation,
    check_blocks,
    pack_rows,
)
from qtc.passes.meta import WRITTEN_MATMULNBITS
from qtc.util.spill import release, spill


class BlockWeightMatMulNBitsRule(pattern.RewriteRuleClassBase):
    """MatMul(x, DequantizeLinear(int4 blocks)) -> MatMulNBits(x, packed, scales, accuracy_level=the recipe's)."""

    def __init__(self, accuracy_level: int) -> None:
        super().__init__(remove_nodes=False)  # a weight read twice keeps its DequantizeLinear; cleanup drops it
        self.accuracy_level = accuracy_level

    def pattern(self, op, x, weight, scale):
        return op.MatMul(x, op.DequantizeLinear(weight, scale, _outputs=["dq"]), _outputs=["product"])

    def check(self, context, x, weight, scale, dq, **_) -> MatchResult:
        result = check_blocks(dq, weight, scale, 0, "weight")
        if result and x.dtype != ir.DataType.FLOAT:
            return result.fail(f"activation is {x.dtype}; MatMulNBits here takes float32 (as its scales)")
        return result

    def rewrite(self, op, x, weight, scale, dq, product, **_):
        block = dq.producer().attributes.get_int("block_size")
        bits = BITS[weight.const_value.dtype]
        q = weight.const_value.numpy()
        k, n = q.shape
        name = weight.name.removesuffix("_quantized")
        # B as [N, K / B, B * bits / 8], transposed and packed a slab of rows at a time (a last partial block is
        # padded with zeros, which the kernel never reads)
        blob = pack_rows(q, bits, block, transpose=True)
        del q  # a view of a memory-mapped (spilled) tensor: the mapping cannot close while it lives
        release(weight.const_value)
        packed = op.initializer(spill(ir.tensor(blob, name=f"{name}_nbits")), name=f"{name}_nbits")
        scales_t = np.ascontiguousarray(scale.const_value.numpy().T)
        scales = op.initializer(spill(ir.tensor(scales_t, name=f"{name}_nbits_scale")), name=f"{name}_nbits_scale")
        level = self.accuracy_level
        if bits == 8:  # see EIGHT_BIT_NOTE
            level = max(level, INT8_GEMM_LEVEL)
        fused = op.MatMulNBits(x, packed, scales, _domain=MS_DOMAIN, K=int(k), N=int(n), bits=bits, block_size=block,
                               accuracy_level=level)
        return carry_annotation(product.producer(), fused)


class WriteMatMulNBitsPass(ir.passes.InPlacePass):
    """Requires InsertQDQPass's block-int4 weight form; writes MatMulNBits with `accuracy_level` (see module);
    8-bit weights at level 4 whatever the recipe's level (EIGHT_BIT_NOTE), which the report says."""

    def __init__(self, accuracy_level: int) -> None:
        super().__init__()
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = pattern.RewriteRuleSet([BlockWeightMatMulNBitsRule.rule(self.accuracy_level)]).apply_to_model(model)
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        model.meta[WRITTEN_MATMULNBITS] = {"nodes": count, "accuracy_level": self.accuracy_level}
        raised = sum(1 for node in model.graph.all_nodes() if node.op_type == "MatMulNBits"
                     and node.attributes.get_int("bits", 4) == 8 and self.accuracy_level < INT8_GEMM_LEVEL)
        if raised:
            model.meta[WRITTEN_MATMULNBITS] |= {"eight_bit_nodes_at_level_4": raised, "note": EIGHT_BIT_NOTE}
        return ir.passes.PassResult(model, modified=bool(count))
