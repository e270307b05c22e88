"""The `qtc` command line: a thin layer over the Python API. Exit codes: 0 ok, 2 bad input or usage, 1 internal."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import onnxruntime
import qtc
import yaml
from qtc import __version__
from qtc.calibration.workloads import WORKLOADS
from qtc.cli.export import export_command
from qtc.errors import QtcError
from qtc.measure.evaluation import evaluate
from qtc.measure.inspection import inspect_model
from qtc.measure.mixed_precision import parse_budget
from qtc.measure.parity import parity
from qtc.measure.sweep import parse_sweep_budgets, sweep, write
from qtc.passes.layerskip import LayerSkipSpec, parse_budgets
from qtc.recipes import builtin_names, builtin_recipe, load_recipe
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)


class QtcGroup(click.Group):
    """Every failure becomes one line on stderr: QtcError and usage errors exit 2, bugs exit 1."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False

        onnxruntime.set_default_logger_severity(4)  # ORT's own log lines would break the one-line error contract
        try:
            result = super().main(*args, **kwargs)
        except QtcError as exc:
            _fail(str(exc), 2)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except click.ClickException as exc:
            _fail(exc.format_message(), 2)
        except Exception as exc:  # a bug in qtc: say so in one line, keep the traceback for QTC_DEBUG=1
            if os.environ.get("QTC_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 1)
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str, code: int) -> None:
    click.echo(f"qtc: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _print_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


@click.group(cls=QtcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qtc")
def main() -> None:
    """qtc: quantization compiler for ONNX models."""


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--recipe", "-r", default="w8a8", show_default=True, help="Built-in recipe name or a recipe .yaml file.")
@click.option("--calib", help="Calibration data: a text corpus (.txt / .jsonl), a workload name, or .npz file(s).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: the one beside MODEL).")
@click.option("--samples", default=64, show_default=True, help="Calibration samples (token windows).")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration sample.")
@click.option("--calibrator", type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
              help="Override the recipe's activation calibrator.")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling calibration windows.")
@click.option("--target", default="cpu", show_default=True, help="Execution target.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Output .onnx path.")
@click.option("--no-compare", is_flag=True, help="Skip the float-vs-compiled comparison on held-out data.")
@click.option("--max-drop", help="METRIC=VALUE (top1, kl, cosine): keep the most sensitive layers in higher "
                                  "precision until the held-out drop is within VALUE.")
@click.option("--allow-fallback", is_flag=True, help="Let a target that splits graphs (cann) keep nodes it cannot "
                                                    "take; they run on the CPU (default: refuse, listing them).")
@click.option("--layer-skip", is_flag=True, help="Gate residual branches on a run-time `budget` input.")
@click.option("--budgets", help="Budget levels for --layer-skip: fractions of branch compute kept [1.0,0.9,0.8,0.7].")
@click.option("--skip-metric", type=click.Choice(["bi", "angular", "loss"]), help="Branch importance for --layer-skip [loss].")
@click.option("--budget-unit", type=click.Choice(["branches", "compute"]),
              help="What a --layer-skip budget counts: branches run, or their weight multiply-adds [branches].")
@click.option("--skip-table-from", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse the skip table of another --layer-skip build of the same model (e.g. its float build).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compile_command(model, recipe, calib, tokenizer, samples, seq_len, calibrator, seed, target, output,
                    no_compare, max_drop, allow_fallback, layer_skip, budgets, skip_metric, budget_unit, skip_table_from,
                    as_json):
    """Compile a float ONNX MODEL with a quantization recipe."""

    options = dict(tokenizer=tokenizer, samples=samples, seq_len=seq_len, calibrator=calibrator, seed=seed, quiet=as_json,
                   allow_fallback=allow_fallback)
    skip = _layer_skip_spec(layer_skip, budgets, skip_metric, budget_unit, skip_table_from)
    if skip is not None:
        if max_drop:
            raise QtcError("--layer-skip and --max-drop cannot be combined yet")
        options["layer_skip"] = skip
    if max_drop:
        result = qtc.compile_within(model, parse_budget(max_drop), recipe=recipe, calib=calib, target=target, **options)
    else:
        result = qtc.compile(model, recipe=recipe, calib=calib, target=target, compare=not no_compare, **options)
    output = output or model.with_name(f"{model.stem}.{result.report['recipe']['name']}.onnx")
    result.save(output)
    if as_json:
        _print_json(result.report)
    else:
        _show_compile(result.report, output)


def _layer_skip_spec(enabled: bool, budgets: str | None, metric: str | None, unit: str | None,
                     table_from: Path | None):

    if not enabled:
        if budgets or metric or unit or table_from:
            raise QtcError("--budgets, --skip-metric, --budget-unit and --skip-table-from need --layer-skip")
        return None
    spec = LayerSkipSpec()
    return LayerSkipSpec(budgets=parse_budgets(budgets) if budgets else spec.budgets, metric=metric or spec.metric,
                         unit=unit or spec.unit, table_from=table_from)


def _show_compile(report: dict, output: Path) -> None:
    table = Table(title=f"qtc compile → {output}", show_header=False)
    table.add_row("recipe", report["recipe"]["name"])
    table.add_row("target", report["target"])
    calib = report["calibration"]
    if calib:
        table.add_row("calibration", f"{calib['source']} sha256 {calib['sha256'][:12]}… {calib['samples']} x "
                                     f"{calib['seq_len']} tokens, {calib['calibrator'] or 'weights only'}, seed {calib['seed']}")
    counts = report["compiled"]["quantized_nodes_by_op"]
    table.add_row("quantized", ", ".join(f"{n} {op}" for op, n in counts.items()) or "nothing")
    kept = sorted(set(report["compiled"]["kept_float_roles"].values()))
    table.add_row("kept float", ", ".join(kept) or "-")
    size = report["output"]
    table.add_row("size", f"{report['size']['source_file_bytes'] / 1e6:.1f} MB → {size['bytes'] / 1e6:.1f} MB")
    for name, stats in report.get("heldout_comparison", {}).get("outputs", {}).items():
        text = f"cosine {stats['cosine']:.5f}, max |diff| {stats['max_abs_diff']:.4g}"
        if "top1_agreement" in stats:
            text += f", top-1 agreement {stats['top1_agreement']:.2%} of {stats['positions']} positions"
        table.add_row(f"vs float: {name}", text)
    fallback = report.get("fallback")
    if fallback:
        table.add_row("--max-drop", f"{fallback['metric']} drop {fallback['attempts'][-1]['drop']:.4f} "
                                    f"{'<=' if fallback['met'] else '>'} {fallback['budget']} with "
                                    f"{len(fallback['kept'])} layers kept in higher precision")
        for step in fallback["attempts"]:
            table.add_row("  attempt", f"{step['kept_layers']} kept: drop {step['drop']:.4f} "
                                       f"(calibration {step['calibration']}, {step['seconds']:.0f} s)")
        for layer in fallback["kept"]:
            table.add_row("  kept", f"{layer['module'] or layer['node']} (SQNR {layer['sqnr_db']:.1f} dB, "
                                    f"{layer['dominant_noise']} noise)")
    for name, entry in (report.get("fusions") or {}).get("fusions", {}).items():
        if entry["applied"]:
            table.add_row(f"fused {name}", f"{entry['in_graph']} x {entry['op']}")
    for mode, entry in (report.get("placement") or {}).items():
        table.add_row(f"placement {mode}", _placement_line(entry))
    for row in (report.get("layer_skip") or {}).get("realized", []):
        skipped = report["layer_skip"]["table"][report["layer_skip"]["budgets"].index(row["budget"])]
        names = [b["name"] for b, s in zip(report["layer_skip"]["branches"]["list"], skipped) if s]
        table.add_row(f"budget {row['budget']:g}", f"skip {row['skipped_branches']} branches ({row['compute_sparsity']:.0%} "
                                                   f"of branch compute): {', '.join(names) or '-'}")
    for note in report.get("target_notes", []):
        table.add_row("target", note)
    table.add_row("time", f"{report['compile_seconds']:.1f} s")
    out.print(table)


def _placement_line(entry: dict) -> str:
    return (f"{entry['npu_nodes']}/{entry['nodes']} nodes on the NPU in {entry['npu_partitions']} partition(s), "
            f"{entry['cpu_nodes']} on the CPU, {entry['host_to_device_tensors']} host->device and "
            f"{entry['device_to_host_tensors']} device->host tensor copies per run "
            f"(>= {entry['host_to_device_static_bytes'] / 1e6:.1f} MB to the device)")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", help="Also predict where each node runs on this target (cann: graph and single-op mode).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect_command(model, target, as_json):
    """Show what MODEL holds: ops, parameters by dtype, opset, external data, quantization, blocks."""

    info = inspect_model(model, target)
    if as_json:
        _print_json(info)
        return
    head = Table(title=f"{info['file']}  (IR {info['ir_version']}, opsets {info['opsets']})", show_header=False)
    for value in info["inputs"]:
        head.add_row("input", f"{value['name']} {value['dtype']} {value['shape']}")
    for value in info["outputs"]:
        head.add_row("output", f"{value['name']} {value['dtype']} {value['shape']}")
    for dtype, nbytes in info["bytes_by_dtype"].items():
        head.add_row(f"tensors {dtype}", f"{info['params_by_dtype'][dtype]:,} elements, {nbytes / 1e6:.2f} MB")
    for location, nbytes in info["external_data"].items():
        head.add_row("external data", f"{location}: {nbytes / 1e6:.2f} MB")
    quantized = info["weights_quantized"]
    head.add_row("weights quantized", f"{quantized['fraction']:.1%} of {quantized['quantized_elements'] + quantized['float_elements']:,}")
    for block in info["repeated_blocks"]:
        head.add_row("repeated blocks", f"{block['prefix']}.N x {block['count']} ({block['params_per_block']:,} params each)")
    branches = info["residual_branches"]
    if branches["branches"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in branches["by_kind"].items())
        head.add_row("residual branches", f"{branches['branches']} in {branches['blocks']} blocks ({kinds})")
    if branches["gates"]:
        head.add_row("budget gates", f"{branches['gates']} branches behind If gates on input 'budget'")
    for key, value in info["qtc_metadata"].items():
        head.add_row(key, value if len(value) < 120 else value[:117] + "...")
    out.print(head)
    ops = Table("op", "count", title="op histogram")
    for op, count in sorted(info["ops"].items(), key=lambda kv: (-kv[1], kv[0])):
        ops.add_row(op, str(count))
    out.print(ops)
    for mode, entry in (info.get("placement") or {}).items():
        table = Table("CPU op", "count", title=f"{target} {mode} mode: {_placement_line(entry)}")
        for op, count in entry["cpu_ops"].items():
            table.add_row(op, str(count))
        for reason, count in entry["cpu_reasons"].items():
            table.add_row(f"reason: {reason}", str(count))
        out.print(table)


@main.command("eval")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--task", required=True, help="zh-news-ppl | zh-reviews-acc | minilm-sts")
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), help="Float model to compare against.")
@click.option("--backend", default="cpu", show_default=True, help="Execution backend.")
@click.option("--limit", type=int, help="Score only the first N units (paragraphs, reviews, sentences).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: the one beside MODEL).")
@click.option("--max-len", default=512, show_default=True, help="Longest token window fed to the model.")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(model, task, baseline, backend, limit, tokenizer, max_len, seed, as_json):
    """Score MODEL on a Chinese workload TASK, with 95 % bootstrap intervals (paired against --baseline)."""

    result = evaluate(model, task, baseline=baseline, backend=backend, limit=limit, tokenizer=tokenizer,
                      max_len=max_len, seed=seed, quiet=as_json)
    if as_json:
        _print_json(result)
    else:
        show_eval(result)


def show_eval(result: dict) -> None:
    data = result["data"]
    title = (f"{result['task']}: {result['model']['file']}"
             + (f" vs {result['baseline']['file']}" if result["baseline"] else "")
             + f"  ({data['units_scored']} of {data['n_items']} {data['name']}:{data['split']} items,"
               f" sha256 {data['sha256'][:12]}…, {result['backend']})")
    table = Table("metric", "value", "95 % interval", title=title)
    for name, metric in result["metrics"].items():
        interval = metric.get("ci95")
        table.add_row(name.replace("_", " "), f"{metric['value']:.4f}",
                      f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "-")
    recipe = result["model"]["metadata"].get("qtc.recipe")
    if recipe:
        calib = result["model"]["metadata"]
        table.caption = (f"recipe {json.loads(recipe)['name']}, calibrated on {calib.get('qtc.calibration.source')} "
                         f"({calib.get('qtc.calibration.samples')} x {calib.get('qtc.calibration.seq_len')} tokens, "
                         f"{calib.get('qtc.calibration.calibrator')}, seed {calib.get('qtc.calibration.seed')})")
    out.print(table)


@main.command("sweep")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--budgets", default="1.0,0.9,0.8,0.7", show_default=True, help="Budgets to measure.")
@click.option("--task", required=True, help="zh-news-ppl | zh-reviews-acc | minilm-sts")
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), help="Float model to compare against.")
@click.option("--limit", type=int, help="Score only the first N units.")
@click.option("--runs", default=20, show_default=True, help="Timed runs per configuration (median).")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per timed run (batch 1).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Prefix for OUT.json and OUT.png (default: beside the first model).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sweep_command(models, budgets, task, baseline, limit, runs, seq_len, output, as_json):
    """Measure layer-skip MODELS at each budget (metric with interval, CPU latency, sparsity) beside the static
    ShortGPT baseline; write a table, JSON and a PNG of the Pareto front."""

    if runs < 1 or seq_len < 2:
        raise QtcError("--runs must be >= 1 and --seq-len >= 2")
    result = sweep(list(models), parse_sweep_budgets(budgets), task, baseline=baseline, limit=limit, runs=runs,
                   seq_len=seq_len, quiet=as_json)
    json_path, png_path = write(result, output or models[0].with_name(f"{models[0].stem}.sweep"))
    if as_json:
        _print_json(result)
        return
    metric = result["metric"]
    table = Table("model", "method", "budget", "skipped", "compute skipped", metric.replace("_", " "), "95 % interval",
                  "latency ms", "vs dense", title=f"{task} budget sweep ({result['rows'][0]['data']['units_scored']} units)")
    for row in result["rows"]:
        m = row["metrics"][metric]
        table.add_row(row["model"], row["method"], f"{row['budget']:g}", str(len(row["skipped"])),
                      f"{row['compute_sparsity']:.1%}", f"{m['value']:.4f}", f"[{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]",
                      f"{row['latency_ms']:.2f}", f"{row['latency_vs_dense']:.3f}")
    out.print(table)
    out.print(f"wrote {json_path} and {png_path}")


@main.command("analyze")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--recipe", "-r", default="w8a8", show_default=True, help="Built-in recipe name or a recipe .yaml file.")
@click.option("--calib", required=True, help="Calibration data: corpus file, workload name, or .npz file(s).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: the one beside MODEL).")
@click.option("--samples", default=16, show_default=True, help="Calibration samples.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per sample.")
@click.option("--calibrator", type=click.Choice(["minmax", "percentile", "entropy", "mse"]))
@click.option("--seed", default=0, show_default=True)
@click.option("--top", default=15, show_default=True, help="Rows to show (all go to --json).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def analyze_command(model, recipe, calib, tokenizer, samples, seq_len, calibrator, seed, top, as_json):
    """Rank MODEL's layers by how much noise RECIPE adds to each (SQNR), and say whether weights or activations."""

    result = qtc.analyze(model, recipe=recipe, calib=calib, tokenizer=tokenizer, samples=samples, seq_len=seq_len,
                         calibrator=calibrator, seed=seed, quiet=as_json)
    if as_json:
        _print_json(result)
        return
    table = Table("layer", "SQNR dB", "weights dB", "activations dB", "noise from", "activation range",
                  "top |x| channels (median)", title=f"sensitivity under {result['recipe']['name']} (lowest SQNR first)")
    for row in result["layers"][:top]:
        rng = row.get("activation_range")
        top3 = row.get("channel_absmax_top")
        table.add_row(row["module"] or row["node"], f"{row['sqnr_db']:.1f}", f"{row['weight_sqnr_db']:.1f}",
                      f"{row['activation_sqnr_db']:.1f}" if "activation_sqnr_db" in row else "-", row["dominant_noise"],
                      f"[{rng[0]:.3g}, {rng[1]:.3g}]" if rng else "-",
                      f"{', '.join(f'{v:.3g}' for v in top3)} ({row['channel_absmax_median']:.3g})" if top3 else "-")
    out.print(table)
    out.print(f"noise dominated by weights in {result['dominant_noise']['weight']} layers, "
              f"by activations in {result['dominant_noise']['activation']}")


@main.command("parity")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backends", default="cpu", show_default=True, help="Comma list: cpu,cuda,cann.")
@click.option("--reference", default="cpu", show_default=True, help="Backend the others are compared with.")
@click.option("--against", type=click.Path(dir_okay=False, path_type=Path), help="Another model to compare with on the reference backend.")
@click.option("--inputs", default="zh-news", show_default=True, help="Workload name, text file, or .npz file(s).")
@click.option("--tokenizer", help="tokenizer.json (default: the one beside MODEL).")
@click.option("--samples", default=4, show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option("--tolerance", help="Override bounds, e.g. cosine=0.999,top1_agreement=0.95.")
@click.option("--feed", "feeds", multiple=True, metavar="NAME=VALUE",
              help="A scalar input for every run, e.g. budget=0.8 for a --layer-skip model (repeatable).")
@click.option("--allow-unavailable", is_flag=True, help="Exit 0 even when a requested backend cannot run here.")
@click.option("--json", "as_json", is_flag=True)
def parity_command(model, backends, reference, against, inputs, tokenizer, samples, seq_len, tolerance, feeds,
                   allow_unavailable, as_json):
    """Check MODEL gives the same outputs on each backend (and close to --against).

    Exit 3 when out of tolerance; exit 4 when a requested backend is unavailable (a CI gate must not pass on a
    machine where the accelerator silently never ran), unless --allow-unavailable."""

    bound = _parse_tolerance(tolerance) if tolerance else None
    result = parity(model, [b.strip() for b in backends.split(",") if b.strip()], reference=reference,
                    against=against, inputs=inputs, tokenizer=tokenizer, samples=samples, seq_len=seq_len, tolerance=bound,
                    feed=_parse_feeds(feeds))
    if as_json:
        _print_json(result)
    else:
        _show_parity(result)
    if not result["passed"]:
        return 3
    unavailable = [name for name, entry in result["backends"].items() if not entry["available"]]
    return 4 if unavailable and not allow_unavailable else 0


def _parse_feeds(items: tuple[str, ...]) -> dict[str, float]:
    feeds = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            feeds[name.strip()] = float(value)
        except ValueError:
            raise QtcError(f"--feed takes NAME=NUMBER (got {item!r})") from None
    return feeds


def _parse_tolerance(text: str) -> dict[str, float]:
    bound = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in ("cosine", "top1_agreement") or not value:
            raise QtcError(f"--tolerance takes cosine=X,top1_agreement=Y (got {item!r})")
        bound[key] = float(value)
    return bound


def _show_parity(result: dict) -> None:
    table = Table("compared", "output", "cosine", "max |diff|", "p99.9 rel", "top-1", title=f"parity: {result['model']} "
                  f"({result['samples']} held-out inputs from {result['inputs']}, reference {result['reference']})")
    rows = [(f"{name} vs {result['reference']}", entry) for name, entry in result["backends"].items()]
    if "against" in result:
        rows.append((f"vs {result['against']['model']}", result["against"]))
    for label, entry in rows:
        if "outputs" not in entry:
            table.add_row(label, "-", "unavailable" if not entry.get("available") else "reference", entry.get("reason", ""), "", "")
            continue
        for name, s in entry["outputs"].items():
            table.add_row(label, name, f"{s['cosine']:.6f}", f"{s['max_abs_diff']:.4g}", f"{s['p99.9_rel_diff']:.3g}",
                          f"{s['top1_agreement']:.2%}" if "top1_agreement" in s else "-")
    out.print(table)
    out.print("PASS" if result["passed"] else "FAIL: " + "; ".join(result["failures"]))


@main.command("workloads")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def workloads_command(as_json):
    """List the Chinese workloads with each split's size and sha256."""

    rows = [w.split_info(split) | {"source": w.source} for w in WORKLOADS.values() for split in w.splits]
    if as_json:
        _print_json({"workloads": rows})
        return
    table = Table("workload", "split", "items", "characters", "sha256", "source")
    for row in rows:
        table.add_row(row["name"], row["split"], f"{row['n_items']:,}", f"{row['n_chars']:,}", row["sha256"][:16] + "…", row["source"])
    out.print(table)


@main.group("recipes", invoke_without_command=True)
@click.pass_context
def recipes_group(ctx):
    """List the built-in recipes (or `show NAME` for one, resolved)."""
    if ctx.invoked_subcommand is None:

        table = Table("recipe", "weights", "activations", "description")
        for name in builtin_names():
            recipe = builtin_recipe(name)
            w = recipe.weight
            a = recipe.activation
            table.add_row(name, f"{w.dtype} per {w.granularity}{' sym' if w.symmetric else ''}",
                          f"{a.dtype} per {a.granularity}, {a.calibrator}" if a else "float",
                          recipe.description)
        out.print(table)


@recipes_group.command("show")
@click.argument("name")
def recipes_show(name):
    """Print the fully resolved recipe NAME (built-in or .yaml) as YAML."""


    click.echo(yaml.safe_dump(load_recipe(name).to_dict(), sort_keys=False, allow_unicode=True).rstrip())


def _register_export() -> None:

    main.add_command(export_command)


_register_export()

if __name__ == "__main__":
    main()
