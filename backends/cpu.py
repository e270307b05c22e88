"""ORT's CPU execution provider: always present, the reference for calibration and parity."""

from qtc.backends.base import Backend

# x86 ORT fuses QDQ MatMuls only with uint8 activations (QDQIsInt8Allowed() is false off ARM, and the S8->U8
# rewrite skips a QuantizeLinear with several consumers), and its AVX2 U8S8 kernel saturates int16 pair sums
# without VNNI: so activations and the weights they meet are stored as uint8 (zero point + 128, exact).
CPU = Backend(
    name="cpu",
    provider="CPUExecutionProvider",
    recipes_native=("w8a8", "w8a16", "w4a16"),
    unsigned_activations=True,
    unsigned_weights=True,
    dynamic_activations_for_int4=True,
    block_table_kernels=True,
    expand_int8_weights=True,
)
