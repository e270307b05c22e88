"""The quantization card: a Markdown page written beside every compiled model (`OUT.card.md`), from its report:
what was done to the model, on what data, what each target really computes, and how far it is from its source.
The evidence a vendor table leaves out (calibration set, sample count, what ran where) is on it."""

from __future__ import annotations


def _spec(spec: dict | None) -> str:
    if not spec:
        return "float"
    parts = [spec["dtype"], spec.get("granularity", "")]
    if spec.get("block_size") and spec.get("granularity") == "block":
        parts.append(f"block {spec['block_size']}")
    parts.append("symmetric" if spec.get("symmetric") else "asymmetric")
    if spec.get("dynamic"):
        parts.append("dynamic (at run time)")
    if spec.get("algorithm") and spec["algorithm"] != "rtn":
        parts.append(spec["algorithm"])
    if spec.get("calibrator"):
        parts.append(f"calibrator {spec['calibrator']}")
    return ", ".join(p for p in parts if p)


def _kept(report: dict) -> str:
    """What the built graph really kept in float (a rule may quantize a role the recipe lists in keep_float)."""
    kept = (report.get("compiled") or {}).get("kept_float_roles") or {}
    names = [f"{role} ({count})" for role, count in sorted(kept.items())] if isinstance(kept, dict) else list(map(str, kept))
    return ", ".join(names) or "nothing"


def _calibration(report: dict) -> list[str]:
    calib = report.get("calibration")
    if not calib or calib.get("source") is None:
        return ["None: the recipe takes no data (weights only, round to nearest)."]
    lines = [f"- source: `{calib['source']}`, sha256 `{calib['sha256']}`",
             f"- {calib['samples']} windows of {calib['seq_len']} tokens ({calib['kind']}), seed {calib['seed']}; "
             f"{calib.get('heldout_samples', 0)} held-out windows for the comparison below",
             f"- tokenizer `{calib.get('tokenizer')}`, sha256 `{calib.get('tokenizer_sha256')}`"]
    audit = report.get("calibration_audit")
    if audit:
        lines.append(f"- audit against `{audit['served']['source']}`: {audit['unseen_token_share']:.1%} of its tokens "
                     f"unseen in the calibration text, unigram KL {audit['unigram_kl_bits']:.3f} bits/token, CJK "
                     f"{audit['calibration']['scripts']['cjk']:.0%} vs {audit['served']['scripts']['cjk']:.0%}")
        lines += [f"- **warning**: {w}" for w in audit["warnings"]]
    return lines


def _numerics(report: dict) -> list[str]:
    lines = [f"- target `{report['target']}`, calibrated and checked on `{report.get('calibrated_on')}`"]
    lines += [f"- {note}" for note in report.get("target_notes") or []]
    numerics = (report.get("runtime_ops") or {}).get("numerics") or {}
    lines += [f"- `{op}`: {text}" for op, text in sorted(numerics.items())]
    return lines


def _agreement(report: dict) -> list[str]:
    lines = []
    check = report.get("post_compile_check") or {}
    if "cosine" in check:
        worst = min(check["cosine"].values())
        lines.append(f"- post-compile check (derived input, source run by {check.get('source_run_by', 'onnxruntime')}): lowest output "
                     f"cosine {worst:.4f}, floor {check.get('floor')}")
    elif check:
        lines.append(f"- post-compile check: {check.get('skipped_source') or check.get('skipped')}")
    heldout = (report.get("heldout_comparison") or {}).get("outputs") or {}
    if heldout:
        lines += ["", "| output (held-out windows) | cosine | top-1 agreement | KL per position |", "|---|---:|---:|---:|"]
        for name, stats in heldout.items():
            if "top1_agreement" in stats or len(heldout) <= 4:
                lines.append(f"| {name} | {stats['cosine']:.5f} | {stats.get('top1_agreement', float('nan')):.2%} | "
                             f"{stats.get('kl_per_position', float('nan')):.4f} |")
    return lines


def quantization_card(report: dict) -> str:
    recipe = report["recipe"]
    size = report["size"]
    output = report.get("output") or {}
    fallback = report.get("fallback")
    sections = [
        f"# Quantization card: {output.get('path', 'model')}",
        "",
        f"Built by qtc {report.get('qtc_version')} from `{(report.get('source') or {}).get('file')}` "
        f"({size['source_tensor_bytes'] / 1e6:,.1f} MB of weights) into {output.get('bytes', 0) / 1e6:,.1f} MB; "
        f"`qtc verify` rebuilds it from the provenance in its metadata.",
        "",
        "## Recipe",
        f"`{recipe['name']}`: {recipe['description']}",
        "",
        f"- weights: {_spec(recipe['weight'])}",
        f"- activations: {_spec(recipe['activation'])}",
        f"- embedding table: {_spec(recipe.get('embedding'))}; kept float: {_kept(report)}",
        f"- rules: {len(recipe.get('overrides') or [])}",
        "",
        "## Calibration",
        *_calibration(report),
        "",
        "## What the target computes",
        *_numerics(report),
        "",
        "## Agreement with the source",
        *(_agreement(report) or ["- not compared (--no-compare)"]),
    ]
    if fallback:
        kept = fallback.get("kept") or fallback.get("layers") or []
        sections += ["", "## Fallbacks", f"- {len(kept)} layers kept at higher precision by --max-drop: "
                     + ", ".join(f"`{k}`" for k in kept[:20]) + (" ..." if len(kept) > 20 else "")]
    sections += ["", "## Not on this card", "Task scores and cross-backend parity are measured after the build: "
                 "`qtc eval MODEL --task zh-news-ppl --baseline SOURCE`, `qtc parity MODEL --backends cpu,cuda`."]
    return "\n".join(sections) + "\n"
