"""Integer quantization arithmetic shared by the QDQ passes (numpy only, no graph code)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qtc.recipes import QuantSpec

INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
# Float grids: symmetric only (zero point 0), scale = amax / largest finite value, values saturate there (ONNX
# QuantizeLinear saturate=1) and round to nearest even in the float format's own spacing.
FLOAT_MAX = {"float8e4m3fn": 448.0}
# Integer values are computed in int8/uint8; `storage_array` casts 4-bit ones to the packed ONNX types.
NUMPY_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int4": np.int8, "uint4": np.uint8,
                "float8e4m3fn": ml_dtypes.float8_e4m3fn}
STORAGE_DTYPES = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}
# Smallest scale we emit: keeps all-zero channels valid (DequantizeLinear needs scale > 0) without overflow.
MIN_SCALE = np.float32(1e-12)


def storage_array(q: np.ndarray, dtype: str) -> np.ndarray:
    """The array as ONNX stores it (4-bit types become ml_dtypes arrays that onnx_ir packs two to a byte)."""
    return q.astype(STORAGE_DTYPES[dtype]) if dtype in STORAGE_DTYPES else q


def weight_qparams(w: np.ndarray, spec: QuantSpec, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a weight: (q, scale, zero_point); per tensor when axis is None, else one scale per slice of axis
    (per channel), or per block of `spec.block_size` along axis (block granularity).

    Symmetric weights use the restricted range [-127, 127] (int4: [-7, 7]) so that +max and -max round to the
    same magnitude.
    """
    w = np.asarray(w, dtype=np.float32)
    if spec.granularity == "block":
        return block_qparams(w, spec, axis)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    if spec.dtype in FLOAT_MAX:
        scale = np.maximum(np.max(np.abs(w), axis=reduce_axes) / FLOAT_MAX[spec.dtype], MIN_SCALE).astype(np.float32)
        zero_point = np.zeros(scale.shape, dtype=NUMPY_DTYPES[spec.dtype])
        return quantize_array(w, scale, zero_point, axis, spec.dtype), scale, zero_point
    qmin, qmax = INT_RANGES[spec.dtype]
    if spec.symmetric:
        amax = np.max(np.abs(w), axis=reduce_axes)
        half = (qmax - qmin) // 2
        scale = np.maximum(amax / half, MIN_SCALE).astype(np.float32)
        zero_point = np.full(scale.shape, (qmin + qmax + 1) // 2, dtype=NUMPY_DTYPES[spec.dtype])
    else:
        lo = np.minimum(np.min(w, axis=reduce_axes), 0.0)
        hi = np.maximum(np.max(w, axis=reduce_axes), 0.0)
        scale, zero_point = _affine(lo, hi, spec.dtype)
    q = quantize_array(w, scale, zero_point, axis, spec.dtype)
    return q, scale, zero_point


def _to_blocks(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """[.., K, ..] -> [K/block, block, rest...] with axis moved first; K is zero-padded up to whole blocks."""
    moved = np.moveaxis(w, axis, 0)
    pad = -moved.shape[0] % block
    if pad:
        moved = np.concatenate([moved, np.zeros((pad, *moved.shape[1:]), dtype=moved.dtype)])
    return moved.reshape(-1, block, *moved.shape[1:])


# Blockwise quantization of a 2-D weight runs in slices of about this size: the half-dozen passes over a slice
# then stay in cache (gemma-3-270m's 262,144 x 640 int8 table: 1.2 -> 0.6 s against 128 MB slices, same bytes).
CHUNK_BYTES = 2 << 20


def block_qparams(w: np.ndarray, spec: QuantSpec, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blockwise quantization as DequantizeLinear(axis, block_size) reads it: scale shape = w.shape with
    w.shape[axis] replaced by ceil(K / block_size).

    Blocks never cross the other axis of a 2-D weight, so a large one is quantized in slices along it: the
    temporaries are a few times one slice, not a few times the weight (a 152k x 3584 embedding is 2.2 GB)."""
    if w.ndim != 2 or w.nbytes <= CHUNK_BYTES:
        return _block_qparams(w, spec, axis)
    other = 1 - axis
    step = max(1, CHUNK_BYTES // (w.nbytes // w.shape[other]))
    parts = [_block_qparams(w[start:start + step] if other == 0 else w[:, start:start + step], spec, axis)
             for start in range(0, w.shape[other], step)]
    return tuple(np.concatenate([part[i] for part in parts], axis=other) for i in range(3))


def _block_qparams(w: np.ndarray, spec: QuantSpec, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = _to_blocks(w, axis, spec.block_size)  # [nb, block, rest...]
    qmin, qmax = INT_RANGES[spec.dtype]
    if spec.symmetric:
        scale = np.maximum(np.abs(blocks).max(axis=1) / ((qmax - qmin) // 2), MIN_SCALE).astype(np.float32)
        zero_point = np.zeros(scale.shape, dtype=NUMPY_DTYPES[spec.dtype]) + (qmin + qmax + 1) // 2
    else:
        scale, zero_point = _affine(np.minimum(blocks.min(axis=1), 0.0), np.maximum(blocks.max(axis=1), 0.0), spec.dtype)
    q = np.rint(blocks / scale[:, None]) + zero_point[:, None].astype(np.float32)
    q = np.clip(q, qmin, qmax).astype(NUMPY_DTYPES[spec.dtype]).reshape(-1, *blocks.shape[2:])[: w.shape[axis]]
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis), np.moveaxis(zero_point.astype(NUMPY_DTYPES[spec.dtype]), 0, axis)


def activation_qparams(lo: float, hi: float, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor (scale, zero_point) for an observed clip range; the range is widened to contain 0 exactly."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if spec.dtype in FLOAT_MAX:
        scale = np.float32(max(max(-lo, hi) / FLOAT_MAX[spec.dtype], float(MIN_SCALE)))
        return np.array(scale, dtype=np.float32), np.zeros((), dtype=NUMPY_DTYPES[spec.dtype])
    if spec.symmetric:
        qmin, qmax = INT_RANGES[spec.dtype]
        amax = max(-lo, hi)
        scale = np.float32(max(amax / ((qmax - qmin) / 2), float(MIN_SCALE)))
        return np.array(scale, dtype=np.float32), np.array((qmin + qmax + 1) // 2, dtype=NUMPY_DTYPES[spec.dtype])
    scale, zero_point = _affine(np.array(lo), np.array(hi), spec.dtype)
    return scale.reshape(()), zero_point.reshape(())


def _affine(lo: np.ndarray, hi: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    qmin, qmax = INT_RANGES[dtype]
    scale = np.maximum((hi - lo) / (qmax - qmin), MIN_SCALE).astype(np.float32)
    zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax).astype(NUMPY_DTYPES[dtype])
    return scale, zero_point


def quantize_array(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, dtype: str) -> np.ndarray:
    """Round-half-to-even, as ONNX QuantizeLinear does (saturating, for float grids)."""
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    if dtype in FLOAT_MAX:  # zero point is 0; the cast rounds to nearest even, but turns overflow into NaN: clip
        q = np.divide(x, scale, dtype=np.float32)
        np.clip(q, -FLOAT_MAX[dtype], FLOAT_MAX[dtype], out=q)
        return q.astype(NUMPY_DTYPES[dtype])
    qmin, qmax = INT_RANGES[dtype]
    # In-place steps: one float temporary the size of x, whatever the tensor's size (2 GB models).
    q = np.divide(x, scale, dtype=np.float32)
    np.rint(q, out=q)
    q += zero_point.astype(np.float32)
    np.clip(q, qmin, qmax, out=q)
    return q.astype(NUMPY_DTYPES[dtype])


def dequantize_array(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (q.astype(np.float32) - zero_point.astype(np.float32)) * scale


def expand_scale(scale: np.ndarray, shape: tuple, axis: int | None, block_size: int | None) -> np.ndarray:
    """A scale (or zero point) broadcast to the weight's full shape."""
    if axis is None:
        return np.broadcast_to(scale, shape)
    if block_size is None:
        view = [1] * len(shape)
        view[axis] = -1
        return np.broadcast_to(scale.reshape(view), shape)
    repeated = np.repeat(scale, block_size, axis=axis)
    return repeated[(slice(None),) * axis + (slice(0, shape[axis]),)]  # the last block's padding cut off: a view


def dequantize_weight(q, scale, zero_point, axis: int | None, block_size: int | None) -> np.ndarray:
    """What DequantizeLinear computes for a weight, for every granularity (in place on one float32 copy of q, and
    no zero point to take away where it is all zero: the rounding searches dequantize a layer per candidate)."""
    levels = q.astype(np.float32)
    if np.any(zero_point):
        levels -= expand_scale(zero_point.astype(np.float32), q.shape, axis, block_size)
    levels *= expand_scale(scale, q.shape, axis, block_size)
    return levels
