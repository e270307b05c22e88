"""What every execution-provider backend offers: sessions on real ONNX Runtime, and what it can run."""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qtc.core.ops import op_key
from qtc.errors import QtcError
from qtc.recipes import FLOAT_DTYPES, INHERIT, Recipe


def session_threads() -> int:
    """Intra-op threads of every qtc session: `QTC_THREADS`, else the cores up to 8."""
    return int(os.environ.get("QTC_THREADS", min(os.cpu_count() or 1, 8)))


@dataclass(frozen=True)
class Backend:
    """One ORT execution provider as a qtc target."""

    name: str
    provider: str
    provider_options: dict = field(default_factory=dict)
    recipes_native: tuple[str, ...] = ()
    # How int8 QDQ is stored for this EP (same integer grid either way; see passes/qdq.py InsertQDQPass).
    unsigned_activations: bool = False
    unsigned_weights: bool = False
    # Block-int4 weights run as MatMulNBits, which quantizes activations itself (dynamic W4A8).
    dynamic_activations_for_int4: bool = False
    # com.microsoft GatherBlockQuantized + MatMulNBits read one packed embedding table (see passes/embedding_tables.py).
    block_table_kernels: bool = False
    float8_kernels: bool = False  # a GEMM that consumes float8 Q/DQ directly (ORT 1.32 CPU has none)
    # Weight-only int8 weights become Cast -> Mul, which ORT folds into float32 at load: its 8-bit MatMulNBits
    # dequantizes the whole weight per call (see passes/weightonly.py).
    expand_int8_weights: bool = False
    compiles: bool = True  # whether `qtc compile --target NAME` is supported (legalization exists)
    # Graph-mode whitelist the compiled graph must stay inside (cann); the pipeline adds the decompositions.
    whitelist_only: bool = False

    def measuring_backend(self) -> "Backend":
        """Where calibration and float-vs-compiled comparisons run: the target itself when it computes the float
        graph as the reference does."""
        return self

    def placement(self, model: ir.Model) -> dict | None:
        """Which nodes run where, for runtimes that split graphs (None: every node runs on this provider)."""
        return None

    def availability(self) -> tuple[bool, str]:
        """Really create a session on this provider with CPU fallback disabled, and run it: a provider that is
        listed but cannot load its libraries (CANN without Ascend drivers) is unavailable, with the loader's
        reason; so is one that creates a session but cannot run (a driver stub, a broken install)."""
        if self.provider not in ort.get_available_providers():
            return False, (f"this onnxruntime {ort.__version__} build has no {self.provider} "
                           f"(it has {', '.join(ort.get_available_providers())})")
        options = ort.SessionOptions()
        if self.provider != CPU_PROVIDER:
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        options.log_severity_level = 4
        try:
            session = _inference_session(_probe_model(), options, [(self.provider, self.provider_options)])
            if session.get_providers()[0] != self.provider:
                return False, f"session fell back to {session.get_providers()[0]}"
            session.run(None, {"x": np.ones((2, 2), np.float32)})
        except Exception as exc:  # ORT raises Fail / RuntimeException with the provider loader's message
            reason = " ".join(str(exc).split())
            loader = _loader_error(self.provider)
            return False, (f"{loader} ({reason})" if loader else reason)[:400]
        return True, "ok"

    def adapt_recipe(self, recipe: Recipe) -> tuple[Recipe, list[str], dict[str, str]]:
        """The recipe as this target runs it, a note for each change, and the session config entries that make
        the runtime compute what the recipe says (written into the model as `qtc.session.*` metadata)."""
        if recipe.weight.dtype in FLOAT_DTYPES and not self.float8_kernels:
            return recipe, [f"{recipe.name} on {self.name}: no float8 GEMM kernel; weights are dequantized to float32 "
                            "on every run and activations rounded to the float8 grid by QuantizeLinear -> "
                            "DequantizeLinear (float8 rounding, float32 arithmetic)"], {}
        expansion = [f"{recipe.name} on {self.name}: weight-only int8 layers are stored int8 and expanded to float32 "
                     "once at session load (ORT's 8-bit MatMulNBits would dequantize them on every call); they compute "
                     "in float32 at float speed"] if self.expand_int8_weights and has_weight_only_int8(recipe) else []
        if recipe.activation is not None and recipe.activation.dynamic:
            return self._dynamic(recipe, expansion)
        if not self.dynamic_activations_for_int4:
            return recipe, expansion, {}
        if recipe.activation is None:
            # ORT fuses weight-only DQ -> MatMul into MatMulNBits, whose default accuracy_level 4 would quietly
            # quantize the "a16" activations to int8: ask for float activations.
            notes = [] if recipe.weight.dtype == "int8" else \
                [f"{recipe.name} on {self.name}: MatMulNBits runs with accuracy_level 0 (float activations)"]
            return recipe, notes + expansion, {ACCURACY_LEVEL: "0"}
        if recipe.weight.dtype not in ("int4", "uint4"):
            return recipe, expansion, {}
        note = (f"{recipe.name} on {self.name}: static int8 activation QDQ would block ORT's MatMulNBits fusion "
                "(its selector takes one DQ input); activations are quantized to int8 per block at run time instead "
                "(MatMulNBits accuracy_level 4)")
        return dataclasses.replace(recipe, activation=None), [note, *expansion], {ACCURACY_LEVEL: "4"}

    def _dynamic(self, recipe: Recipe, expansion: list[str]) -> tuple[Recipe, list[str], dict[str, str]]:
        """Run-time activation quantization: MatMulNBits accuracy_level 4 quantizes each activation row to int8
        per block of K as it runs; the graph carries weight blocks only. Without that kernel, activations stay float."""
        weight_only = dataclasses.replace(recipe, activation=None)
        if recipe.weight.granularity != "block":
            raise QtcError(f"recipe '{recipe.name}': dynamic activations run in MatMulNBits, which takes block weights "
                           "(granularity: block)")
        if not self.dynamic_activations_for_int4:
            return weight_only, [f"{recipe.name} on {self.name}: no run-time int8 activation kernel; activations stay "
                                 "float (the weights are the recipe's)", *expansion], {}
        return weight_only, [f"{recipe.name} on {self.name}: activations quantized to int8 per block of "
                             f"{recipe.weight.block_size} along K at run time (MatMulNBits accuracy_level 4)",
                             *expansion], {ACCURACY_LEVEL: "4"}

    def runtime_ops(self, model: ir.Model) -> dict[str, int]:
        """The op histogram after ORT's own graph optimizations: which kernels (and numerics) really run.

        E.g. block-int4 DequantizeLinear -> MatMul becomes com.microsoft::MatMulNBits on CPU; QDQ around a
        MatMul becomes QLinearMatMul / MatMulIntegerToFloat; what stays DequantizeLinear runs in float.
        Inside `sharing_sessions()` the session that wrote the optimized graph is the model's shared session (the
        post-compile check and the held-out comparison run on it: one load of the compiled model, not two).
        """
        with tempfile.TemporaryDirectory(prefix="qtc-optimized-") as folder:
            source, optimized = Path(folder) / "model.onnx", Path(folder) / "optimized.onnx"
            ir.save(model, source, external_data="model.onnx.data")
            session = self._open(source, optimized=optimized)
            counts: dict[str, int] = {}
            _count_ops(onnx.load(str(optimized), load_external_data=False).graph, counts)
        shared = _SHARED.get()
        if shared is not None:
            shared.setdefault((self.name, _model_key(model)), session)
        return dict(sorted(counts.items()))

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT's warnings about unused initializers etc. are noise to our users
        # Fixed thread count: calibration ranges and reports must not depend on how busy the machine is.
        options.intra_op_num_threads = session_threads()
        if not _SPINNING.get():
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def providers(self) -> list:
        return [(self.provider, self.provider_options)] + ([] if self.provider == CPU_PROVIDER else [CPU_PROVIDER])

    def session(self, model: str | os.PathLike | bytes | ir.Model) -> ort.InferenceSession:
        """A session that honours the model's `qtc.session.*` metadata (the numerics its recipe asked for); inside
        `sharing_sessions()`, the one session already opened for the same model."""
        shared = _SHARED.get()
        if shared is None:
            return self._open(model)
        key = (self.name, _model_key(model))
        if key not in shared:
            shared[key] = self._open(model)
        if isinstance(shared[key], concurrent.futures.Future):  # opened ahead (`open_ahead`): its error, if any, is
            shared[key] = shared[key].result()  # raised here, as opening it here would have
        return shared[key]

    def open_ahead(self, model: str | os.PathLike | bytes) -> concurrent.futures.Future:
        """Start opening a session for a model file (or its bytes) on a thread, for `adopt_session` to hand out.
        ONNX Runtime lets go of the GIL while it builds a session (2.6 s for gemma-3-270m's float source), so a
        compile opens the source its checks run beside its own one-threaded passes. The session gets the caller's
        settings (spinning)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        context = contextvars.copy_context()

        def work() -> None:
            try:
                future.set_result(context.run(self._open, model))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the session
                future.set_exception(exc)

        threading.Thread(target=work, name="qtc-open-ahead").start()
        return future

    def adopt_session(self, model: str | os.PathLike | bytes, future: concurrent.futures.Future) -> None:
        """Inside `sharing_sessions()`, `session(model)` is then the session `open_ahead(model)` is opening."""
        shared = _SHARED.get()
        if shared is not None:
            shared.setdefault((self.name, _model_key(model)), future)

    def _open(self, model: str | os.PathLike | bytes | ir.Model, optimized: Path | None = None) -> ort.InferenceSession:
        """`optimized`: where the session also writes the graph ORT optimized (its initializers beside it)."""
        if isinstance(model, ir.Model):
            return self._session_from_ir(model)
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        options = self.session_options()
        if optimized is not None:
            options.optimized_model_filepath = str(optimized)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        for key, value in session_config(model).items():
            options.add_session_config_entry(key, value)
        session = _inference_session(model, options, self.providers())
        if session.get_providers()[0] != self.provider:
            # Never report a CPU run as an accelerator run.
            raise BackendUnavailable(f"{self.name}: session runs on {session.get_providers()[0]}, not {self.provider}")
        return session

    def _session_from_ir(self, model: ir.Model) -> ort.InferenceSession:
        # Through a temporary folder with external data: the model may be > 2 GiB, and may still point at the
        # source's external data files, which a serialized protobuf in memory cannot carry.
        with tempfile.TemporaryDirectory(prefix="qtc-session-") as folder:
            path = Path(folder) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return self._open(path)


def _count_ops(graph: onnx.GraphProto, counts: dict[str, int]) -> None:
    """Ops of a graph and of its subgraphs (If branches hold what a layer-skip gate runs)."""
    for node in graph.node:
        key = op_key(node)
        counts[key] = counts.get(key, 0) + 1
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _count_ops(sub, counts)


def has_weight_only_int8(recipe: Recipe) -> bool:
    """Whether some layer of the recipe may get int8 weights with float activations (globally or by a rule)."""
    if recipe.activation is None and recipe.weight.dtype == "int8" and recipe.op_types:
        return True  # (a recipe with no op types quantizes nothing: the `float` baseline)
    for rule in recipe.rules:
        weight = recipe.weight if rule.weight is INHERIT else rule.weight
        if rule.quantize is not False and rule.activation is None and weight is not None and weight.dtype == "int8":
            return True
    return False


CPU_PROVIDER = "CPUExecutionProvider"
PROVIDER_LIBRARIES = {"CANNExecutionProvider": "libonnxruntime_providers_cann.so",
                      "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so"}
ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qtc_shared_sessions", default=None)
_SPINNING: contextvars.ContextVar[bool] = contextvars.ContextVar("qtc_spinning", default=True)


@contextlib.contextmanager
def without_spinning():
    """Within it, sessions' worker threads sleep when a run ends instead of spinning for the next run. A compile
    interleaves its runs with numpy work on the same cores (X^T X after each calibration run, the held-out
    statistics), and ORT's spinning workers took cores from it: gemma-3-270m's w4a16 GPTQ compile took 2.5 % less
    wall time and 4 % less CPU without (farm-bench, 3 pairs on 2 cores). Servers, `qtc bench` and evaluation keep
    ORT's default."""
    token = _SPINNING.set(False)
    try:
        yield
    finally:
        _SPINNING.reset(token)


@contextlib.contextmanager
def sharing_sessions():
    """Within it, `Backend.session` opens each model once (a compile's post-compile check, held-out comparison
    and their source runs load the source and the compiled model once each, not three times), and the sessions
    stay open together until it ends: only for models that fit in memory side by side."""
    shared: dict = {}
    token = _SHARED.set(shared)
    try:
        yield
    finally:
        _SHARED.reset(token)
        for value in shared.values():  # no session is still being opened once it ends
            if isinstance(value, concurrent.futures.Future):
                value.exception()


def sessions_shared() -> bool:
    return _SHARED.get() is not None


def _model_key(model: str | os.PathLike | bytes | ir.Model) -> tuple:
    """One session per model as given: a file by its path, bytes and in-memory models by identity (an in-memory
    model with outputs added for a comparison is another graph)."""
    if isinstance(model, ir.Model):
        return "ir", id(model), tuple(v.name for v in model.graph.outputs)
    if isinstance(model, bytes):
        return "bytes", id(model)
    return "path", os.path.abspath(os.fspath(model))


def _inference_session(model, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    # enable_fallback=0: after a provider fails, ORT's Python wrapper otherwise retries on CPU (printing a banner to
    # stdout, which breaks --json), and the retry's error replaces the provider's own.
    return ort.InferenceSession(model, options, providers=providers, enable_fallback=0)


def _loader_error(provider: str) -> str | None:
    """Why the provider's shared library cannot load (e.g. libascendcl.so missing), which ORT's own error hides."""
    name = PROVIDER_LIBRARIES.get(provider)
    path = Path(ort.__file__).parent / "capi" / name if name else None
    if path is None or not path.exists():
        return None
    try:
        ctypes.CDLL(str(path))
    except OSError as exc:
        return f"{name} cannot be loaded: {exc}"
    return None


class BackendUnavailable(RuntimeError):
    """The provider could not run the session (and qtc will not substitute another)."""


def _probe_model() -> bytes:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 2]))
    node = ir.node("MatMul", [x, x], outputs=[ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 2]))])
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 13})
    return ir.to_proto(ir.Model(graph, ir_version=8)).SerializeToString()
SESSION_PREFIX = "qtc.session."


def session_config(model: str | bytes) -> dict[str, str]:
    """`qtc.session.<key>` metadata of a model file (or serialized bytes), as ORT session config entries."""
    proto = onnx.load(model, load_external_data=False) if isinstance(model, str) else onnx.load_from_string(model)
    return {p.key.removeprefix(SESSION_PREFIX): p.value for p in proto.metadata_props if p.key.startswith(SESSION_PREFIX)}


@functools.cache
def max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads, found by loading a one-node model.

    The onnx package can write IR versions newer than the runtime reads (onnx 1.23 writes 14, ORT 1.31
    reads 13), so qtc asks the runtime rather than trusting a table.
    """
    for version in range(onnx.IR_VERSION, 6, -1):
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
        node = ir.node("Identity", [x], outputs=[ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))])
        graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 13})
        try:
            ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=version)).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
            return version
        except Exception:  # ORT raises its own Fail/InvalidGraph types for unsupported IR versions
            continue
    raise RuntimeError("onnxruntime loads no IR version >= 7")


# What each fused kernel computes, for the report: the numerics that actually run, not the ones in the recipe.
KERNEL_NUMERICS = {
    "com.microsoft::MatMulNBits": "block-quantized weights; activations quantized to int8 per block on the fly "
    "(accuracy_level 4, ORT's default)",
    "com.microsoft::MatMulIntegerToFloat": "integer GEMM of quantized activations and weights, float output",
    "QLinearMatMul": "integer GEMM with quantized output",
    "DequantizeLinear": "dequantized to float at run time; the consumer computes in float",
    "com.microsoft::GatherBlockQuantized": "embedding rows dequantized from their blocks at lookup",
    "QuantizeLinear": "activations rounded to the recipe's grid at run time (per tensor, calibrated scale)",
}


def runtime_numerics(ops: dict[str, int], config: dict[str, str]) -> dict[str, str]:
    texts = dict(KERNEL_NUMERICS)
    if config.get(ACCURACY_LEVEL) in ("0", "1"):
        texts["com.microsoft::MatMulNBits"] = f"block-quantized weights, float activations ({ACCURACY_LEVEL}={config[ACCURACY_LEVEL]})"
    return {op: f"{ops[op]} x {text}" for op, text in texts.items() if ops.get(op)}
