"""The `qtc` command line: a thin layer over the Python API. Exit codes: 0 ok, 2 bad input or usage, 1 internal."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click
import onnxruntime
import yaml

import qtc
from qtc import __version__
from qtc.calibration.workloads import WORKLOADS
from qtc.cli import render
from qtc.cli.export import export_command
from qtc.cli.options import (
    layer_skip_spec,
    parse_budgets,
    parse_feeds,
    parse_list,
    parse_max_drop,
    parse_size,
    parse_tolerance,
)
from qtc.errors import QtcError
from qtc.frontends.onnx_file import check_writable
from qtc.grid import cells_of, run_grid, write_table
from qtc.measure.audit import audit_calibration, audit_tokenizer
from qtc.measure.bench import bench
from qtc.measure.coverage import activation_coverage, coverage_warnings
from qtc.measure.evaluation import evaluate
from qtc.measure.generate import Sampling, generate_text
from qtc.measure.inspection import inspect_model
from qtc.measure.parity import parity
from qtc.measure.sweep import sweep, write
from qtc.recipes import builtin_names, builtin_recipe, load_recipe
from qtc.verify import verify


class QtcGroup(click.Group):
    """Every failure becomes one line on stderr: QtcError and usage errors exit 2, bugs exit 1."""
    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False

        onnxruntime.set_default_logger_severity(4)  # ORT's own log lines would break the one-line error contract
        if not os.environ.get("QTC_DEBUG"):  # the IR libraries log recoverable failures with tracebacks (e.g. a
            for library in ("onnx_ir", "onnxscript"):  # shape inference that gives up): qtc goes on, so do they
                logging.getLogger(library).setLevel(logging.ERROR)
        # signal handlers can only be set on the main thread: a CLI embedded in a worker thread keeps the default
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
        try:
            result = super().main(*args, **kwargs)
        except QtcError as exc:
            _fail(str(exc), 2)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort): outputs are staged
            _fail("interrupted; nothing was written", 130)  # and renamed only when whole, so none is partial
        except click.ClickException as exc:
            _fail(exc.format_message(), 2)
        except Exception as exc:  # a bug in qtc: say so in one line, keep the traceback for QTC_DEBUG=1
            if os.environ.get("QTC_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 1)
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(result if isinstance(result, int) else 0)


def _interrupt(signum, frame) -> None:
    """SIGTERM (a job scheduler, `kill`, a CI timeout) ends a compile as Ctrl-C does: the stack unwinds, so the
    scratch folders of a 7B compile (tens of GB of spilled weights) are removed, not left in TMPDIR."""
    raise KeyboardInterrupt


def _fail(message: str, code: int) -> None:
    click.echo(f"qtc: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _print_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def _emit(data: dict, as_json: bool, show) -> None:
    """--json prints the data; otherwise `show()` renders it as tables."""
    if as_json:
        _print_json(data)
    else:
        show()


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
@click.option("--memory-limit", help="Memory the compile may use, e.g. 6GB (default: what is available now). "
                                     "Weights over a third of it are spilled to disk as they are quantized; a float "
                                     "source over half of it is not run beside the compiled model.")
@click.option("--audit-against", help="Text the model will serve (a file, or a workload's eval split): audit how "
                                      "well --calib covers it (qtc audit-calib) into the report, warning when it does not.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compile_command(model, recipe, calib, tokenizer, samples, seq_len, calibrator, seed, target, output,
                    no_compare, max_drop, allow_fallback, layer_skip, budgets, skip_metric, budget_unit, skip_table_from,
                    memory_limit, audit_against, as_json):
    """Compile a float ONNX MODEL with a quantization recipe."""
    options = dict(tokenizer=tokenizer, samples=samples, seq_len=seq_len, calibrator=calibrator, seed=seed, quiet=as_json,
                   allow_fallback=allow_fallback)
    limit = parse_size(memory_limit, "--memory-limit")
    audit = None
    if audit_against:  # before the compile: a bad corpus fails in seconds, not after calibration
        if not calib:
            raise QtcError("--audit-against audits the calibration text: pass --calib")
        audit = audit_calibration(calib, audit_against, audit_tokenizer(tokenizer, model))
    if output is not None:
        check_writable(output)  # before minutes of calibration, not after
    skip = layer_skip_spec(layer_skip, budgets, skip_metric, budget_unit, skip_table_from)
    if skip is not None:
        if max_drop:
            raise QtcError("--layer-skip and --max-drop cannot be combined yet")
        options["layer_skip"] = skip
    if max_drop and limit is not None:
        raise QtcError("--memory-limit and --max-drop cannot be combined yet (--max-drop compares against the float "
                       "model in memory)")
    if max_drop:
        result = qtc.compile_within(model, parse_max_drop(max_drop), recipe=recipe, calib=calib, target=target, **options)
    else:
        result = qtc.compile(model, recipe=recipe, calib=calib, target=target, compare=not no_compare,
                             memory_limit=limit, **options)
    output = output or model.with_name(f"{model.stem}.{result.report['recipe']['name']}.onnx")
    if audit is not None:
        result.report["calibration_audit"] = audit
    result.save(output)
    _emit(result.report, as_json, lambda: render.show_compile(result.report, output))
    if audit is not None and not as_json:
        for warning in audit["warnings"]:
            click.echo(f"warning: calibration audit: {warning}", err=True)


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", help="Also predict where each node runs on this target (cann: graph and single-op mode).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect_command(model, target, as_json):
    """Show what MODEL holds: ops, parameters by dtype, opset, external data, quantization, blocks."""
    info = inspect_model(model, target)
    _emit(info, as_json, lambda: render.show_inspect(info, target))


@main.command("eval")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--task", required=True, help="zh-news-ppl | zh-reviews-acc | minilm-sts")
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), help="Float model to compare against.")
@click.option("--target", "--backend", "target", default="cpu", show_default=True, help="Execution target (--backend: old spelling).")
@click.option("--limit", type=int, help="Score only the first N units (paragraphs, reviews, sentences).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: the one beside MODEL).")
@click.option("--max-len", default=512, show_default=True, help="Longest token window fed to the model.")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(model, task, baseline, target, limit, tokenizer, max_len, seed, as_json):
    """Score MODEL on a Chinese workload TASK, with 95 % bootstrap intervals (paired against --baseline)."""
    result = evaluate(model, task, baseline=baseline, backend=target, limit=limit, tokenizer=tokenizer,
                      max_len=max_len, seed=seed, quiet=as_json)
    _emit(result, as_json, lambda: render.show_eval(result))


@main.command("table")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--recipes", required=True, help="Comma-separated recipe names or .yaml files.")
@click.option("--calib", "calibs", required=True, help="Comma-separated calibration sources (workloads or files).")
@click.option("--task", default="zh-news-ppl", show_default=True, help="Evaluation task of every cell.")
@click.option("--limit", type=int, help="Score only the first N units.")
@click.option("--samples", default=32, show_default=True, help="Calibration windows per compile.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", "prefix", required=True, type=click.Path(path_type=Path),
              help="PREFIX: writes PREFIX.json, PREFIX.md, PREFIX.png and the cells under PREFIX.cells/.")
@click.option("--ray", "ray_address", help="Run the cells as Ray tasks: `local` (start a local cluster), `auto` "
                                          "(the cluster this node joined) or a cluster ADDRESS (needs qtc[ray]).")
@click.option("--cpus-per-cell", default=1.0, show_default=True, help="CPUs each Ray task asks for.")
@click.option("--gpus-per-cell", default=0.0, show_default=True, help="GPUs each Ray task asks for.")
@click.option("--memory-per-cell", help="Memory each Ray task asks for, e.g. 8GB (Ray schedules it only where free).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def table_command(model, recipes, calibs, task, limit, samples, seq_len, seed, prefix, ray_address, cpus_per_cell,
                  gpus_per_cell, memory_per_cell, as_json):
    """A recipe x calibration grid on MODEL: each cell compiled and evaluated against MODEL (in this process, or
    as Ray tasks); finished cells are kept and not redone; a table, JSON and a size-vs-accuracy plot."""
    cells = cells_of(model, parse_list(recipes), parse_list(calibs), samples, seq_len, seed, task, limit)
    check_writable(Path(f"{prefix}.json"))

    def show(status: dict) -> None:
        if not as_json:
            eta = f", ETA {status['eta_s']:.0f} s" if status["eta_s"] is not None else ""
            click.echo(f"cells: {status['done']}/{status['total']} done, {status['running']} running, "
                       f"{status['failed']} failed{eta}", err=True)

    memory = parse_size(memory_per_cell, "--memory-per-cell")
    if ray_address is None and (gpus_per_cell or memory is not None):
        raise QtcError("--gpus-per-cell and --memory-per-cell are Ray resource requests: add --ray")
    results = run_grid(cells, prefix, ray_address, cpus_per_cell, show, memory, gpus_per_cell)
    summary = write_table(results, prefix, model.name if model.name != "model.onnx" else f"{model.parent.name}/{model.name}")
    _emit(summary, as_json, lambda: render.show_table(summary, prefix))


@main.command("verify")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--source", type=click.Path(dir_okay=False, path_type=Path),
              help="The float model it was built from (default: its recorded name beside MODEL or here).")
@click.option("--calib", help="The calibration text or .npz it was built with, when not a workload.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), help="tokenizer.json (default: beside the source).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(model, source, calib, tokenizer, as_json):
    """Rebuild MODEL from the provenance it carries and compare: exit 0 when the bytes are identical, 3 when not
    (listing the tensors that differ)."""
    result = verify(model, source=source, calib=calib, tokenizer=tokenizer, quiet=as_json)
    _emit(result, as_json, lambda: render.show_verify(result))
    return 0 if result["identical"] else 3


@main.command("audit-calib")
@click.option("--calib", required=True, help="Calibration text: a file (.txt / .jsonl) or a workload (its calib split).")
@click.option("--against", required=True, help="The text the model will serve: a file, or a workload (its eval split).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: the one beside --model).")
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path),
              help="The model: its tokenizer, and the activation ranges its calibration gives vs what it serves.")
@click.option("--recipe", default="w8a8", show_default=True,
              help="With --model: the recipe whose statically quantized activations are covered.")
@click.option("--target", type=click.Choice(["cpu", "cuda", "cann"]), default="cpu", show_default=True)
@click.option("--samples", default=8, show_default=True, help="With --model: windows of each text to run.")
@click.option("--seq-len", default=256, show_default=True, help="With --model: tokens per window.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def audit_calib_command(calib, against, tokenizer, model, recipe, target, samples, seq_len, seed, as_json):
    """How well calibration text covers served text, through the model's tokenizer: unseen and rare tokens,
    unigram KL, script shares; with --model, also the share of each quantized activation's served values outside
    the range the calibration text gives it. Warns when the calibration text under-covers what will be served."""
    tokenizer = audit_tokenizer(tokenizer, model)
    result = audit_calibration(calib, against, tokenizer)
    if model is not None:
        coverage = activation_coverage(model, calib, against, tokenizer, recipe=recipe, target=target,
                                       samples=samples, seq_len=seq_len, seed=seed, quiet=as_json)
        result["activation_coverage"] = coverage
        result["warnings"] += coverage_warnings(coverage)
    _emit(result, as_json, lambda: render.show_audit(result))


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
@click.option("--ray", "ray_address", help="Score the budgets as Ray tasks (`local`, `auto` or a cluster ADDRESS); "
                                          "latencies stay paired on this machine.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sweep_command(models, budgets, task, baseline, limit, runs, seq_len, output, ray_address, as_json):
    """Measure layer-skip MODELS at each budget (metric with interval, CPU latency, sparsity) beside the static
    ShortGPT baseline; write a table, JSON and a PNG of the Pareto front."""
    if runs < 1 or seq_len < 2:
        raise QtcError("--runs must be >= 1 and --seq-len >= 2")
    result = sweep(list(models), list(parse_budgets(budgets)), task, baseline=baseline, limit=limit, runs=runs,
                   seq_len=seq_len, quiet=as_json, ray_address=ray_address)
    written = write(result, output or models[0].with_name(f"{models[0].stem}.sweep"))
    _emit(result, as_json, lambda: render.show_sweep(result, task, written))


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
    _emit(result, as_json, lambda: render.show_analysis(result, top))


@main.command("parity")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--targets", "--backends", "targets", default="cpu", show_default=True, help="Comma list: cpu,cuda,cann (--backends: old spelling).")
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
def parity_command(model, targets, reference, against, inputs, tokenizer, samples, seq_len, tolerance, feeds,
                   allow_unavailable, as_json):
    """Check MODEL gives the same outputs on each backend (and close to --against).

    Exit 3 when out of tolerance; exit 4 when a requested backend is unavailable (a CI gate must not pass on a
    machine where the accelerator silently never ran), unless --allow-unavailable."""
    bound = parse_tolerance(tolerance) if tolerance else None
    result = parity(model, parse_list(targets), reference=reference,
                    against=against, inputs=inputs, tokenizer=tokenizer, samples=samples, seq_len=seq_len, tolerance=bound,
                    feed=parse_feeds(feeds))
    _emit(result, as_json, lambda: render.show_parity(result))
    if not result["passed"]:
        return 3
    unavailable = [name for name, entry in result["backends"].items() if not entry["available"]]
    return 4 if unavailable and not allow_unavailable else 0


@main.command("generate")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, help="Tokens to generate (stops early at EOS).")
@click.option("--sample", is_flag=True, help="Sample from the softmax instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, help="Softmax temperature for --sample.")
@click.option("--top-k", default=0, show_default=True, help="Sample among the K most likely tokens (0: all).")
@click.option("--seed", default=0, show_default=True, help="Seed of --sample.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: the one beside MODEL).")
@click.option("--target", default="cpu", show_default=True, help="Execution target.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate_command(model, prompt, max_new_tokens, sample, temperature, top_k, seed, tokenizer, target, as_json):
    """Continue PROMPT with MODEL through ONNX Runtime (the KV-cache feed loop a server runs; see README)."""
    result = generate_text(model, prompt, max_new_tokens=max_new_tokens, tokenizer=tokenizer, target=target,
                           sampling=Sampling(sample, temperature, top_k, seed))
    _emit(result, as_json, lambda: render.show_generation(result))


@main.command("bench")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), help="Float decoder to compare against.")
@click.option("--prompt-len", default=256, show_default=True, help="Prompt tokens for time to first token.")
@click.option("--new-tokens", default=32, show_default=True, help="Decode steps timed per round.")
@click.option("--rounds", default=5, show_default=True, help="Timed rounds (models alternate; median).")
@click.option("--prompts", "n_prompts", default=50, show_default=True, help="zh-news prompts for greedy agreement.")
@click.option("--agree-tokens", default=32, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--target", default="cpu", show_default=True, help="Execution target.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_command(model, baseline, prompt_len, new_tokens, rounds, n_prompts, agree_tokens, target, as_json):
    """Serve-time figures of a decoder (TTFT, decode tokens/s, peak RSS, bytes) and its greedy agreement with
    --baseline over zh-news prompts, with bootstrap intervals."""
    result = bench(model, baseline, prompt_len=prompt_len, new_tokens=new_tokens, rounds=rounds, n_prompts=n_prompts,
                   agree_tokens=agree_tokens, target=target, quiet=as_json)
    _emit(result, as_json, lambda: render.show_bench(result))


@main.command("workloads")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def workloads_command(as_json):
    """List the Chinese workloads with each split's size and sha256."""
    rows = [w.split_info(split) | {"source": w.source} for w in WORKLOADS.values() for split in w.splits]
    _emit({"workloads": rows}, as_json, lambda: render.show_workloads(rows))


@main.group("recipes", invoke_without_command=True)
@click.pass_context
def recipes_group(ctx):
    """List the built-in recipes (or `show NAME` for one, resolved)."""
    if ctx.invoked_subcommand is None:
        render.show_recipes([builtin_recipe(name) for name in builtin_names()])


@recipes_group.command("show")
@click.argument("name")
def recipes_show(name):
    """Print the fully resolved recipe NAME (built-in or .yaml) as YAML."""
    click.echo(yaml.safe_dump(load_recipe(name).to_dict(), sort_keys=False, allow_unicode=True).rstrip())


main.add_command(export_command)

if __name__ == "__main__":
    main()
