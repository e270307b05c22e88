"""KV-cache decoders side by side: float, qtc recipes and the ORT GenAI builder's int4, on one machine, one run.

    nice python bench/decoder_table.py FLOAT_DECODER/model.onnx --name qwen2.5-coder-0.5b \
        --rows w8a8-sq-down16,w4a16-mlp8-awq,w4a8-gptq --builder BUILDER_OUT/model.onnx [--limit 30]

For each row: `qtc compile` (zh-news calibration, --samples x --seq-len), `qtc eval --task zh-news-ppl --baseline
FLOAT --limit N` (bits/char, paired delta with its interval), `qtc bench --baseline FLOAT` (TTFT for a 256-token
prompt, decode tok/s, paired ratios, peak RSS, bytes, greedy agreement over --prompts zh-news prompts x 32 tokens).
Writes bench/results/decoders_NAME.{json,md}. Every command is the CLI a user runs; this script only tabulates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS_DIR, machine, qtc_json  # noqa: E402


def row(label: str, model: Path, float_model: Path, args, compile_report: dict | None = None) -> dict:
    scored = qtc_json("eval", str(model), "--task", "zh-news-ppl", "--baseline", str(float_model), "--limit", str(args.limit))
    timed = qtc_json("bench", str(model), "--baseline", str(float_model), "--prompts", str(args.prompts),
                "--rounds", str(args.rounds))
    return {"row": label, "model": str(model), "eval": scored, "bench": timed,
            "compile_seconds": compile_report.get("compile_seconds") if compile_report else None}


def markdown(rows: list[dict], name: str) -> str:
    lines = [f"# {name}: KV-cache decoders on ORT CPU (batch 1)", "",
             "| row | bits/char | Δ vs float [95% CI] | identical 32 greedy [95% CI] | first divergence | MB | TTFT ms "
             "(x float) | decode tok/s (x float) | peak RSS MB | compile s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        metrics = r["eval"]["metrics"]
        bpc = metrics["bits_per_char"]
        delta = metrics.get("delta_bits_per_char")
        b = r["bench"]["rows"][0]
        agree = b.get("agreement")
        ident = f"{agree['identical']['value']:.0%} [{agree['identical']['ci95'][0]:.0%}, {agree['identical']['ci95'][1]:.0%}]" if agree else "-"
        first = f"{agree['first_divergence']['value']:.1f}" if agree else "-"
        lines.append(
            f"| {r['row']} | {bpc['value']:.3f} | "
            + (f"{delta['value']:+.3f} [{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}]" if delta else "-")
            + f" | {ident} | {first} | {b['bytes'] / 1e6:,.0f} | {b['ttft_ms']:.0f}"
            + (f" ({b['ttft_vs_baseline']:.2f})" if b.get("ttft_vs_baseline") else "")
            + f" | {b['decode_tokens_per_s']:.1f}"
            + (f" ({b['decode_speed_vs_baseline']:.2f})" if b.get("decode_speed_vs_baseline") else "")
            + f" | {b['peak_rss_bytes'] / 1e6:,.0f} | {r['compile_seconds'] or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("float_model", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--rows", default="w8a8-sq-down16,w4a16,w4a8-gptq")
    parser.add_argument("--builder", type=Path, help="the ORT GenAI builder's int4 model.onnx of the same source")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("out/decoders"))
    parser.add_argument("--no-float-row", action="store_true", help="skip float's own row (measured in another run)")
    parser.add_argument("--reuse", action="store_true", help="keep a row's model already compiled under --work")
    args = parser.parse_args()
    rows = [] if args.no_float_row else [row("float", args.float_model, args.float_model, args)]
    for recipe in [r for r in args.rows.split(",") if r]:
        label = Path(recipe).stem  # a built-in name, or a recipe YAML such as bench/recipes/w4a8-gptq-h4.yaml
        out = args.work / args.name / label / "model.onnx"
        sidecar = out.with_name(out.stem + ".qtc.json")
        if args.reuse and sidecar.is_file():  # compiled by an earlier run of the same rows: its report
            report = json.loads(sidecar.read_text())
        else:
            report = qtc_json("compile", str(args.float_model), "--recipe", recipe, "--calib", "zh-news", "--samples",
                         str(args.samples), "--seq-len", str(args.seq_len), "-o", str(out))
        rows.append(row(f"qtc {label}", out, args.float_model, args, report))
        print(markdown(rows, args.name), flush=True)
    if args.builder:
        rows.append(row("ORT GenAI builder int4 (defaults)", args.builder, args.float_model, args))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    protocol = {"calibration": f"zh-news {args.samples} x {args.seq_len}", "eval": f"zh-news-ppl first {args.limit}",
                "prompts": args.prompts, "rounds": args.rounds, "machine": machine()}
    (RESULTS_DIR / f"decoders_{args.name}.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
    (RESULTS_DIR / f"decoders_{args.name}.md").write_text(markdown(rows, args.name))
    print(markdown(rows, args.name))


if __name__ == "__main__":
    main()
