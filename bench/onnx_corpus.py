"""Any ONNX in: compile every model of a corpus w8a16 and count what happens.

    nice python bench/onnx_corpus.py [--recipe w8a16] [--extra MODEL.onnx ...] [--limit N]

The corpus: the real and operator-test models that ship inside the `onnx` wheel (onnx/backend/test/data: CV
classics in `real`/`light`, PyTorch operator and converted-module tests, `simple` graphs; opsets 6 to 12), plus any
`--extra` models (exporter outputs: `python bench/exporter_models.py DIR` writes 78 of them, torch modules and
transformers models, TorchScript and dynamo exporters, opsets 9 to 23). Each compile runs in-process through `qtc.compile`; the outcome is one of:
compiled (the post-compile check ran the output on a feed derived from the source and it agreed, or the source
itself could not run on such a feed: `check skipped`), refused (QtcError: the one-line exit-2 message), or internal
error (anything else: the exit-1 class this bench exists to drive to zero). Writes bench/results/onnx_corpus.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS_DIR  # noqa: E402

import qtc  # noqa: E402
from qtc.errors import QtcError  # noqa: E402


def corpus() -> list[Path]:
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    return sorted(root.rglob("model.onnx"))


def opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return min([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [0])


def compile_one(path: Path, recipe: str, out: Path) -> dict:
    try:
        result = qtc.compile(path, recipe=recipe, quiet=True)
        result.save(out)
    except QtcError as exc:
        return {"outcome": "refused", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the class this bench counts
        return {"outcome": "internal error", "message": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "where": traceback.format_exc().splitlines()[-3].strip()}
    check = result.report.get("post_compile_check", {})
    return {"outcome": "compiled", "check": "skipped" if "skipped" in check else "passed",
            "source_run_by": check.get("source_run_by", "")[:14] or None, "skipped": check.get("skipped"),
            "min_cosine": min(check.get("cosine", {}).values(), default=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="w8a16")
    parser.add_argument("--extra", type=Path, nargs="*", default=[])
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    models = (corpus() + list(args.extra))[: args.limit]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(models):
            row = {"model": str(path).split("test/data/")[-1], "opset": opset(path)}
            row |= compile_one(path, args.recipe, Path(tmp) / f"{i}.onnx")
            rows.append(row)
            print(f"{i + 1}/{len(models)} {row['model']} (opset {row['opset']}): {row['outcome']}"
                  + (f" - {row['message']}" if "message" in row else ""), flush=True)
    counts = collections.Counter(r["outcome"] for r in rows)
    checks = collections.Counter(r.get("check") for r in rows if r["outcome"] == "compiled")
    opsets = collections.Counter(r["opset"] for r in rows)
    judges = collections.Counter(r.get("source_run_by") for r in rows if r.get("check") == "passed")
    cosines = [r["min_cosine"] for r in rows if r.get("min_cosine") is not None]
    summary = {"recipe": args.recipe, "models": len(rows), "outcomes": dict(counts), "checks": dict(checks),
               "opsets": dict(sorted(opsets.items())), "source_run_by": dict(judges),
               "min_cosine": min(cosines, default=None), "below_0.98": sum(c < 0.98 for c in cosines),
               "onnx": onnx.__version__}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "onnx_corpus.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    lines = [f"# {len(rows)} models compiled {args.recipe}", "", f"outcomes: {dict(counts)}; post-compile check: {dict(checks)} "
             f"(source run by {dict(judges)}; min cosine {summary['min_cosine']}, {summary['below_0.98']} below 0.98); "
             f"opsets: {dict(sorted(opsets.items()))}", "", "| model | opset | outcome | message |", "|---|---:|---|---|"]
    lines += [f"| {r['model']} | {r['opset']} | {r['outcome']} | {(r.get('message') or r.get('skipped') or '')[:160]} |"
              for r in rows if r["outcome"] != "compiled" or r.get("check") == "skipped"]
    (RESULTS_DIR / "onnx_corpus.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("QTC_THREADS", "1")
    main()
