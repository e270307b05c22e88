"""Tables for people: each command's result rendered with rich (the same data `--json` prints)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Column, Table

out = Console()


def show_compile(report: dict, output: Path) -> None:
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
    compared = report.get("heldout_comparison", {}).get("outputs", {})
    shown = {n: v for n, v in compared.items() if "top1_agreement" in v} or compared  # a decoder: logits, not caches
    for name, stats in shown.items():
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
        table.add_row(f"placement {mode}", placement_line(entry))
    for row in (report.get("layer_skip") or {}).get("realized", []):
        skipped = report["layer_skip"]["table"][report["layer_skip"]["budgets"].index(row["budget"])]
        names = [b["name"] for b, s in zip(report["layer_skip"]["branches"]["list"], skipped) if s]
        table.add_row(f"budget {row['budget']:g}", f"skip {row['skipped_branches']} branches ({row['compute_sparsity']:.0%} "
                                                   f"of branch compute): {', '.join(names) or '-'}")
    for note in report.get("target_notes", []):
        table.add_row("target", note)
    table.add_row("time", f"{report['compile_seconds']:.1f} s")
    out.print(table)


def placement_line(entry: dict) -> str:
    return (f"{entry['npu_nodes']}/{entry['nodes']} nodes on the NPU in {entry['npu_partitions']} partition(s), "
            f"{entry['cpu_nodes']} on the CPU, {entry['host_to_device_tensors']} host->device and "
            f"{entry['device_to_host_tensors']} device->host tensor copies per run "
            f"(>= {entry['host_to_device_static_bytes'] / 1e6:.1f} MB to the device)")


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


def show_parity(result: dict) -> None:
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


def show_inspect(info: dict, target: str | None) -> None:
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
        table = Table("CPU op", "count", title=f"{target} {mode} mode: {placement_line(entry)}")
        for op, count in entry["cpu_ops"].items():
            table.add_row(op, str(count))
        for reason, count in entry["cpu_reasons"].items():
            table.add_row(f"reason: {reason}", str(count))
        out.print(table)


def show_sweep(result: dict, task: str, written: tuple[Path, Path]) -> None:
    metric = result["metric"]
    decoder = any("decode" in row for row in result["rows"])
    columns = ["model", "method", "budget", "skipped", "compute skipped", metric.replace("_", " "), "95 % interval",
               "latency ms", "vs dense", *(["TTFT ms", "decode tok/s"] if decoder else [])]
    table = Table(*columns, title=f"{task} budget sweep ({result['rows'][0]['data']['units_scored']} units)")
    for row in result["rows"]:
        m = row["metrics"][metric]
        cells = [row["model"], row["method"], f"{row['budget']:g}", str(len(row["skipped"])),
                 f"{row['compute_sparsity']:.1%}", f"{m['value']:.4f}", f"[{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]",
                 f"{row['latency_ms']:.2f}", f"{row['latency_vs_dense']:.3f}"]
        if decoder:
            cells += [f"{row['decode']['ttft_ms']:.1f}", f"{row['decode']['decode_tokens_per_s']:.1f}"]
        table.add_row(*cells)
    out.print(table)
    out.print(f"wrote {written[0]} and {written[1]}")


def show_analysis(result: dict, top: int) -> None:
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


def show_workloads(rows: list[dict]) -> None:
    table = Table("workload", "split", "items", "characters", "sha256", "source")
    for row in rows:
        table.add_row(row["name"], row["split"], f"{row['n_items']:,}", f"{row['n_chars']:,}", row["sha256"][:16] + "…", row["source"])
    out.print(table)


def recipe_line(recipe) -> tuple[str, str, str, str]:
    """One row per recipe: name, weights, activations and the first sentence of its description."""
    w, a = recipe.weight, recipe.activation
    weights = f"{w.dtype} {w.granularity}" + (f" {w.block_size}" if w.granularity == "block" else "")
    if w.algorithm != "rtn":
        weights += f" {w.algorithm}"
    if recipe.smooth:
        weights += " +smooth"
    activations = f"{a.dtype} {a.granularity}" if a else "float"
    summary = recipe.description.split(". ")[0].split("\n")[0].rstrip(".")
    return recipe.name, weights, activations, summary


def show_recipes(recipes: list) -> None:
    rows = [recipe_line(recipe) for recipe in recipes]
    headers = ("recipe", "weights", "activations", "what it is")
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    room = max(12, out.width - sum(widths) - 3 * 4 - 1)  # one line a recipe at any width: borders take 3 a column
    table = Table(*headers, title="built-in recipes (qtc recipes show NAME)")
    for name, weights, activations, summary in rows:
        table.add_row(name, weights, activations, summary if len(summary) <= room else summary[:room - 1] + "…")
    out.print(table)


def show_generation(result: dict) -> None:
    out.print(f"[bold]{result['prompt']}[/bold]{result['text']}", highlight=False)
    speed = result["decode_tokens_per_s"]
    out.print(f"{result['model']}: {len(result['tokens'])} new tokens after {result['prompt_tokens']} prompt tokens, "
              f"first token {result['ttft_ms']:.1f} ms" + (f", then {speed:.1f} tokens/s" if speed else "")
              + ("" if result["kv_cache"] else " (no KV cache: the whole sequence is re-run per token)"),
              highlight=False, style="dim")


def show_bench(result: dict) -> None:
    p = result["protocol"]
    table = Table("model", "MB", "TTFT ms", "tok/s", "RSS MB", "x base", f"same {p['agree_tokens']}", "diverge at",
                  title=f"batch 1, {p['prompt_len']}-token prompt, {p['new_tokens']} decode steps, median of {p['rounds']} "
                        f"paired rounds; greedy agreement over {p['prompts']} {p['workload']} prompts",
                  caption="x base: TTFT and decode speed as ratios to the baseline (paired by round); same: share of "
                          "prompts whose greedy tokens all match the baseline's; diverge at: mean first differing position")
    for row in result["rows"]:
        agree = row.get("agreement")
        ident = agree["identical"] if agree else None
        first = agree["first_divergence"] if agree else None
        table.add_row(row["model"], f"{row['bytes'] / 1e6:.1f}", f"{row['ttft_ms']:.1f}", f"{row['decode_tokens_per_s']:.1f}",
                      f"{row['peak_rss_bytes'] / 1e6:.0f}",
                      f"{row['ttft_vs_baseline']:.2f}, {row['decode_speed_vs_baseline']:.2f}" if agree else "-",
                      f"{ident['value']:.0%} [{ident['ci95'][0]:.0%}, {ident['ci95'][1]:.0%}]" if agree else "-",
                      f"{first['value']:.1f} [{first['ci95'][0]:.1f}, {first['ci95'][1]:.1f}]" if agree else "-")
    out.print(table)


def show_audit(result: dict) -> None:
    calib, served = result["calibration"], result["served"]
    table = Table("", "calibration", "served", title=f"calibration audit ({result['tokenizer']})")
    table.add_row("text", calib["source"], served["source"])
    table.add_row("sha256", calib["sha256"][:12] + "…", served["sha256"][:12] + "…")
    table.add_row("texts / chars", f"{calib['texts']:,} / {calib['chars']:,}", f"{served['texts']:,} / {served['chars']:,}")
    table.add_row("tokens (distinct)", f"{calib['tokens']:,} ({calib['distinct_tokens']:,})",
                  f"{served['tokens']:,} ({served['distinct_tokens']:,})")
    for script in ("cjk", "latin", "digit", "other"):
        table.add_row(f"{script} characters", f"{calib['scripts'][script]:.1%}", f"{served['scripts'][script]:.1%}")
    table.caption = (f"served tokens unseen in calibration {result['unseen_token_share']:.1%}, rare (< {result['rare_below']}) "
                     f"{result['rare_token_share']:.1%}; unigram KL(served || calibration) {result['unigram_kl_bits']:.3f} bits/token; "
                     f"most frequent unseen: {' '.join(repr(t['token']) for t in result['top_unseen'][:6]) or '-'}")
    out.print(table)
    if "activation_coverage" in result:
        show_coverage(result["activation_coverage"])
    for warning in result["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {warning}")


def show_coverage(coverage: dict) -> None:
    table = Table(Column("layer", no_wrap=True), "calibration range", "served range", "served / calib", "served values clipped",
                  title=f"activation coverage ({coverage['recipe']} on {coverage['target']}, min/max ranges, "
                        f"{coverage['samples']} x {coverage['seq_len']} tokens of each text)")
    for row in coverage["worst"]:
        table.add_row(row["layer"].split("/")[0].removeprefix("model."), "[{:.3g}, {:.3g}]".format(*row["calibration_range"]),
                      "[{:.3g}, {:.3g}]".format(*row["served_range"]), f"{row['served_over_calibration'] or 0:.2f}",
                      f"{row['clipped_share']:.3%}")
    table.caption = (f"{coverage['activations_clipping']} of {coverage['activations']} activations clip more than "
                     f"{coverage['clip_warn']:.1%} of their served values; mean clipped share "
                     f"{coverage['clipped_share_mean']:.4%}, max {coverage['clipped_share_max']:.3%}")
    out.print(table)


def show_verify(result: dict) -> None:
    built = result["rebuilt_from"]
    out.print(f"rebuilt {Path(result['model']).name} from {built['source']} with {built['recipe']} for {built['target']}"
              + (f", calibration {built['calibration']}" if built["calibration"] else "")
              + f" (built by qtc {result['built_by']}, verified by {result['verified_by']})")
    if result["identical"]:
        out.print("[green]identical[/green]: the same bytes")
        return
    table = Table("tensor", "difference", title="[red]not identical[/red]")
    for row in result["differences"]:
        table.add_row(row["tensor"], row["difference"])
    out.print(table)


def show_table(summary: dict, prefix) -> None:
    table = Table("recipe", "calibration", "Δ bits/char [95% CI]", "KL / token", "MB", "error",
                  title=f"{summary['model']}: recipes x calibration")
    for cell in summary["cells"]:
        metrics = cell.get("metrics") or {}
        delta, kl = metrics.get("delta_bits_per_char"), metrics.get("kl_per_token")
        table.add_row(Path(cell["recipe"]).stem, cell["calib"],
                      f"{delta['value']:+.4f} [{delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f}]" if delta else "-",
                      f"{kl['value']:.4f}" if kl else "-", f"{cell['bytes'] / 1e6:,.1f}" if "bytes" in cell else "-",
                      cell.get("error", ""))
    table.caption = f"{prefix}.json, {prefix}.md, {prefix}.png; cells in {prefix}.cells/"
    out.print(table)
