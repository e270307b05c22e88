"""ONNX files in and out: validated loading (inline or external data, > 2 GB) and atomic saving."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir
from google.protobuf.message import DecodeError

from qtc.errors import QtcError

# Above this many bytes of tensors a model is saved with external data (protobuf cannot hold 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model; external data stays memory-mapped, so this is cheap for models of any size."""
    path = Path(path)
    if not path.is_file():
        raise QtcError(f"model not found: {path}")
    try:
        model = ir.load(path)
    except (DecodeError, ValueError, RuntimeError, TypeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QtcError(f"{path.name} is not a readable ONNX model (truncated or not ONNX: {reason})") from None
    check_structure(model, path.name)
    check_external_data(model, path)
    return model


def check_structure(model: ir.Model, where: str) -> None:
    """Catch files that parse as protobuf but are not a whole model (a file cut at a field boundary parses)."""
    graph = model.graph
    if "" not in model.opset_imports or (len(graph) == 0 and not graph.outputs):
        raise QtcError(f"{where} is not an ONNX model (no default-domain opset or no graph)")
    if not graph.outputs:
        raise QtcError(f"{where} has no graph outputs (truncated file?)")
    for node in graph.all_nodes():  # a flipped byte can leave a name that is not text (protobuf keeps the bytes)
        if not all(isinstance(text, str) for text in (node.op_type, node.domain, node.name or "")):
            raise QtcError(f"{where} is damaged: a node's operator or name is not text")
    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for value in node.inputs:
            if value is not None and id(value) not in defined and value.producer() is None:
                raise QtcError(f"{where}: node {node.name!r} reads {value.name!r}, which nothing defines (truncated file?)")
        defined.update(id(v) for v in node.outputs)
    for value in graph.outputs:
        if id(value) not in defined:
            raise QtcError(f"{where}: graph output {value.name!r} is never computed (truncated file?)")
    for value in all_initializers(model):  # inline data must fill its shape (external data is checked on its own)
        if value.const_value is not None and not isinstance(value.const_value, ir.ExternalTensor):
            try:
                value.const_value.numpy()
            except (ValueError, TypeError) as exc:
                raise QtcError(f"{where}: initializer {value.name!r} is damaged ({exc})") from None


def all_initializers(model: ir.Model) -> list[ir.Value]:
    """Initializers of the main graph and of every subgraph (a layer-skip `If` branch keeps its weights inside,
    where ONNX Runtime's fusions look for them)."""
    graphs = [model.graph]
    for node in model.graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                graphs.append(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                graphs.extend(attr.value)
    return [value for graph in graphs for value in graph.initializers.values()]


def external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    return [v.const_value for v in all_initializers(model) if isinstance(v.const_value, ir.ExternalTensor)]


def check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse external-data locations that escape the model's folder, and missing or short data files."""
    folder = path.resolve().parent
    for tensor in external_tensors(model):
        location = Path(tensor.location)
        target = (folder / location).resolve()
        if location.is_absolute() or not target.is_relative_to(folder):
            raise QtcError(
                f"initializer {tensor.name!r} points outside the model's folder: {tensor.location} (refused)"
            )
        if not target.is_file():
            raise QtcError(f"external data file missing for initializer {tensor.name!r}: {tensor.location}")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if target.stat().st_size < end:
            raise QtcError(f"external data file {tensor.location} is shorter than initializer {tensor.name!r} needs")


def file_bytes(path: Path, model: ir.Model) -> int:
    """Bytes on disk of a model file and the external data files it names."""
    files = {path.resolve()} | {(path.parent / t.location).resolve() for t in external_tensors(model)}
    return sum(f.stat().st_size for f in files)


def tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in all_initializers(model) if v.const_value is not None)


def _inline_external_tensors(model: ir.Model) -> None:
    for value in all_initializers(model):
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.tensor(value.const_value.numpy().copy(), name=value.name)


def data_file_name(out_path: Path) -> str:
    return out_path.name + ".data"


def save_model(model: ir.Model, out_path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Write the model (and its external data beside it) atomically: temp folder first, then rename.

    A failure leaves no partial output. Returns the files written. `external_data=None` chooses external data
    when the model came with external data or its tensors exceed EXTERNAL_DATA_THRESHOLD. Either way every
    tensor ends up in the output's own files, never as a reference to the input's data file.
    """
    out_path = Path(out_path)
    check_writable(out_path)
    try:
        return _save(model, out_path, external_data)
    except OSError as exc:  # disk full, read-only file system, permissions: the user's to fix; nothing is left behind
        raise QtcError(f"cannot write {out_path}: {exc.strerror or exc}") from None


def check_writable(out_path: Path) -> None:
    """Refuse, before any work, an output whose folder cannot be made or written (checked on the nearest folder
    that exists; root passes permission bits, so the write itself is checked again in save_model)."""
    folder = Path(out_path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise QtcError(f"cannot write {out_path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QtcError(f"cannot write {out_path}: {folder} is not writable")


def _save(model: ir.Model, out_path: Path, external_data: bool | None) -> list[Path]:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = bool(external_tensors(model)) or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        _inline_external_tensors(model)
    data_name = data_file_name(out_path)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        ir.save(model, staging / out_path.name, external_data=data_name if external_data else None)
        written = []
        if external_data:
            os.replace(staging / data_name, out_path.parent / data_name)
            written.append(out_path.parent / data_name)
        os.replace(staging / out_path.name, out_path)
        written.append(out_path)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
