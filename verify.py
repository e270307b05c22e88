"""`qtc verify MODEL`: rebuild a compiled model from the provenance it carries and say whether the bytes are the
same; if not, which tensors differ and by how much.

What a compile records (`api._provenance`): the recipe as asked for (`qtc.recipe.requested`), the target, the
source model's file name and sha256, the calibration source (a workload split or a file name), its sha256,
samples, sequence length, seed, and the tokenizer's name and sha256, and the qtc version. Verification finds each
input (the source by `--source`, else by its recorded name beside MODEL or in the working directory; a calibration
file by `--calib`, else by name beside the source; a workload by name; the tokenizer by `--tokenizer`, else beside
the source), refuses any whose sha256 differs from the record, compiles again in this process and compares the
files byte for byte, then tensor by tensor. Models built with --layer-skip are not rebuilt yet (refused).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qtc.api import compile as compile_model
from qtc.calibration.workloads import get_workload, is_workload
from qtc.errors import QtcError
from qtc.recipes import parse_recipe
from qtc.util.cache import sha256_file
from qtc.util.version import __version__

SOURCE = "qtc.source.file"


def _metadata(path: Path) -> dict[str, str]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's parse errors
        raise QtcError(f"{path} is not an ONNX model ({' '.join(str(exc).split())[:120]})") from None
    return {p.key: p.value for p in model.metadata_props}


def _find(recorded: str, given: str | os.PathLike | None, places: list[Path], what: str, sha256: str | None) -> Path:
    """The input a compile used: `given`, else the first of `places` holding a file of the recorded name; its
    sha256 must be the recorded one."""
    candidates = [Path(given)] if given else [place / recorded for place in places]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise QtcError(f"verify: the {what} {recorded!r} is not at {', '.join(map(str, candidates))}; pass its path")
    if sha256 and sha256_file(found) != sha256:
        raise QtcError(f"verify: {found} is not the {what} this model was built from (sha256 differs from the record)")
    return found


def _calibration(meta: dict, calib, source: Path) -> str | None:
    label = meta.get("qtc.calibration.source")
    if label is None:
        return None
    name, _, split = label.rpartition(":")
    if meta.get("qtc.calibration.kind") == "text" and split == "calib" and is_workload(name) and calib is None:
        if get_workload(name).split_info("calib")["sha256"] != meta.get("qtc.calibration.sha256"):
            raise QtcError(f"verify: the installed workload {name} is not the text this model was calibrated on")
        return name
    if meta.get("qtc.calibration.kind") != "text":
        if calib is None:
            raise QtcError(f"verify: calibration came from .npz files ({label}); pass them with --calib")
        return str(calib)
    return str(_find(label, calib, [source.parent, Path.cwd()], "calibration text", meta.get("qtc.calibration.sha256")))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=True)
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # layer-skip branches and Constant nodes hold tensors too
        for attr in node.attribute:
            if attr.HasField("t"):
                found[f"{node.name}/{attr.name}"] = numpy_helper.to_array(attr.t)
    return found


def tensor_differences(ours: Path, theirs: Path) -> list[dict]:
    """Per tensor (by name): missing on one side, a dtype or shape change, or the largest |difference|."""
    a, b = _tensors(ours), _tensors(theirs)
    rows = []
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            rows.append({"tensor": name, "difference": "only in the " + ("rebuilt model" if name in a else "model")})
        elif a[name].dtype != b[name].dtype or a[name].shape != b[name].shape:
            rows.append({"tensor": name, "difference": f"{b[name].dtype}{list(b[name].shape)} vs rebuilt "
                                                       f"{a[name].dtype}{list(a[name].shape)}"})
        elif not np.array_equal(a[name], b[name]):
            diff = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))
            rows.append({"tensor": name, "difference": f"max |diff| {float(diff.max()):.6g}, "
                                                       f"{int((diff > 0).sum())} of {diff.size} values"})
    return rows


def _files(path: Path) -> dict[str, bytes]:
    data = path.with_name(path.name + ".data")
    return {p.name.replace(path.name, "MODEL"): p.read_bytes() for p in (path, data) if p.is_file()}


def verify(model: str | os.PathLike, source: str | os.PathLike | None = None, calib: str | os.PathLike | None = None,
           tokenizer: str | os.PathLike | None = None, quiet: bool = True) -> dict:
    path = Path(model)
    if not path.is_file():
        raise QtcError(f"model not found: {path}")
    meta = _metadata(path)
    if "qtc.recipe" not in meta:
        raise QtcError(f"{path.name} carries no qtc provenance (was it compiled by qtc?)")
    if any(key.startswith("qtc.layer_skip") for key in meta):
        raise QtcError("verify does not rebuild --layer-skip builds yet")
    recipe_json = meta.get("qtc.recipe.requested")
    if recipe_json is None:
        raise QtcError(f"{path.name} was compiled by qtc {meta.get('qtc.version')} before the requested recipe was "
                       "recorded; it cannot be rebuilt exactly")
    places = [path.parent, Path.cwd()]
    source_path = _find(meta[SOURCE], source, [p for p in places if (p / meta[SOURCE]).resolve() != path.resolve()],
                        "source model", meta.get("qtc.source.sha256"))
    calibration = _calibration(meta, calib, source_path)
    tokenizer_path = None
    if meta.get("qtc.calibration.kind") == "text":
        tokenizer_path = _find(meta["qtc.calibration.tokenizer"], tokenizer, [source_path.parent], "tokenizer",
                               meta.get("qtc.calibration.tokenizer_sha256"))
    options = {}
    if calibration is not None:
        options = dict(samples=int(meta["qtc.calibration.samples"]), seq_len=int(meta["qtc.calibration.seq_len"]),
                       seed=int(meta["qtc.calibration.seed"]), tokenizer=tokenizer_path)
    recipe = parse_recipe(json.loads(recipe_json), "qtc.recipe.requested")
    result = compile_model(source_path, recipe=recipe, calib=calibration, target=meta.get("qtc.target", "cpu"),
                           compare=False, quiet=quiet, **options)
    with tempfile.TemporaryDirectory(prefix="qtc-verify-") as folder:
        rebuilt = Path(folder) / path.name  # the same file name: the external data's name is inside the model
        result.save(rebuilt)
        theirs, ours = _files(path), _files(rebuilt)
        identical = theirs == ours
        differences = [] if identical else tensor_differences(rebuilt, path)
        if not identical and not differences:
            differences = [{"tensor": "(graph or metadata)", "difference": "tensors equal; the graph or metadata differ"}]
    return {"model": str(path), "identical": identical, "differences": differences,
            "rebuilt_from": {"source": str(source_path), "calibration": calibration,
                             "tokenizer": str(tokenizer_path) if tokenizer_path else None,
                             "recipe": recipe.name, "target": meta.get("qtc.target", "cpu")},
            "built_by": meta.get("qtc.version"), "verified_by": __version__}
