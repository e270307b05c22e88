"""Check the CANN facts qtc relies on against the real `onnxruntime-cann` wheel, without Ascend hardware.

The wheel (1.24.4) needs NumPy < 2 and provides its own `onnxruntime` module, so it lives in a separate virtual
environment, never in qtc's main one. Its provider library `libonnxruntime_providers_cann.so` links against
`libascendcl.so`, `libacl_op_compiler.so` and `libfmk_onnx_parser.so` (CANN toolkit); without them it cannot be
loaded at all, and ORT builds the CANN kernel registry only once it is loaded. Stub libraries that export the
imported symbols (returning 0 / a dummy handle) let it load, so the registry and `GetCapability` can be read.

    python tools/cann_wheel_check.py setup [--env /tmp/cann-env] [--pkg /tmp/cann-pkg]
        builds the environment (idempotent): python3.11 venv, numpy<2, onnxruntime-cann==1.24.4, qtc's other
        dependencies (not onnxruntime), and PKG/qtc -> this repository for PYTHONPATH.
    python tools/cann_wheel_check.py stubs --out /tmp/cann-stubs
        generates and compiles (gcc) the stub CANN libraries from `nm -D --undefined-only` of the provider library.
    python tools/cann_wheel_check.py registry [--json backends/cann_kernels.json]
        dumps the CANN EP kernel registry (`get_all_opkernel_def()`, single-op mode) into the JSON.
    python tools/cann_wheel_check.py graph-whitelist [--json backends/cann_kernels.json]
        recovers the graph-mode (enable_cann_subgraph=1) op whitelist of `SupportONNXModel()` from the provider
        library's machine code and relocations (binutils), and adds it to the JSON.
    python tools/cann_wheel_check.py probe [--out bench/results/cann_probe.json]
        small models on CANNExecutionProvider with the stubs: which nodes GetCapability gave CANN, per mode.
    python tools/cann_wheel_check.py parity --model M --inputs DIR
        `qtc parity M --backends cpu,cann --json` in the CANN environment without and with the stubs.
    python tools/cann_wheel_check.py all --model M --inputs DIR
        every step above in order.

The stubs make a fake device: anything that "runs" on them computes nothing. They are for reading what the
provider library decides (registry, partitioning), never for numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
KERNELS_JSON = REPO / "backends" / "cann_kernels.json"
WHEEL = "onnxruntime-cann==1.24.4"
# qtc's dependencies from pyproject.toml, except onnxruntime (the CANN wheel provides the `onnxruntime` module)
# and numpy (pinned below 2: the 1.24.4 wheel fails to import under NumPy 2 with "_ARRAY_API not found").
ENV_PACKAGES = ["numpy<2", WHEEL, "onnx>=1.18,<1.25", "onnx-ir>=1.0,<2", "onnxscript>=0.6,<0.8", "click>=8.1",
                "rich>=13", "tokenizers>=0.20", "pyyaml>=6", "psutil>=5.9"]
PROVIDER_LIB = "libonnxruntime_providers_cann.so"
CANN_LIBS = ("libascendcl.so", "libacl_op_compiler.so", "libfmk_onnx_parser.so")
INT_MAX = 2**31 - 1
DEFAULT_ENV, DEFAULT_PKG, DEFAULT_STUBS = Path("/tmp/cann-env"), Path("/tmp/cann-pkg"), Path("/tmp/cann-stubs")


# ---------------------------------------------------------------------------------------------------- setup
def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def _env_ok(env: Path) -> bool:
    if not env_python(env).exists():
        return False
    check = ("import importlib.metadata as m, numpy, onnx, onnx_ir, onnxscript, click, rich, tokenizers, yaml, psutil;"
             "assert m.version('onnxruntime-cann') == '1.24.4' and int(numpy.__version__.split('.')[0]) < 2")
    return subprocess.run([env_python(env), "-c", check], capture_output=True).returncode == 0


def setup(env: Path, pkg: Path) -> None:
    """Idempotent: a python3.11 venv with the CANN wheel, and PKG/qtc -> this repository."""
    if _env_ok(env):
        print(f"{env}: ready")
    else:
        base = shutil.which("python3.11") or sys.executable
        if not env_python(env).exists():
            subprocess.run([base, "-m", "venv", str(env)], check=True)
        subprocess.run([env_python(env), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([env_python(env), "-m", "pip", "install", "-q", *ENV_PACKAGES, "pytest>=8"], check=True)
        if not _env_ok(env):
            raise SystemExit(f"{env}: installed, but the import check still fails")
    pkg.mkdir(parents=True, exist_ok=True)
    link = pkg / "qtc"
    if not (link.is_symlink() and link.resolve() == REPO):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO)
    out = subprocess.run([env_python(env), "-c", "import onnxruntime, numpy, qtc; print(onnxruntime.__version__, "
                          "numpy.__version__, onnxruntime.get_available_providers())"],
                         env=_env_vars(pkg), capture_output=True, text=True)
    print(out.stdout.strip() or out.stderr.strip())


def _env_vars(pkg: Path, stubs: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(pkg), QTC_THREADS=os.environ.get("QTC_THREADS", "1"),
               OMP_NUM_THREADS="1")
    env.pop("LD_LIBRARY_PATH", None)
    if stubs is not None:
        env["LD_LIBRARY_PATH"] = str(stubs)
    return env


def provider_lib(env: Path) -> Path:
    found = sorted(env.glob(f"lib/python3*/site-packages/onnxruntime/capi/{PROVIDER_LIB}"))
    if not found:
        raise SystemExit(f"no {PROVIDER_LIB} under {env}: run `setup` first")
    return found[0]


def _tool(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


# ---------------------------------------------------------------------------------------------------- stubs
# Symbols whose stub must do more than `return 0`: outputs the provider library reads back, and allocations it
# writes into. Everything else returns 0 (ACL_SUCCESS / GRAPH_SUCCESS) and touches nothing.
_SPECIAL = {
    "aclrtGetDeviceCount": "long aclrtGetDeviceCount(uint32_t *n) { if (n) *n = 1; return 0; }",  # a fake device
    "aclrtGetDevice": "long aclrtGetDevice(int32_t *d) { if (d) *d = 0; return 0; }",
    "aclrtGetSocName": 'const char *aclrtGetSocName(void) { return "qtc-stub-soc"; }',
    "aclGetRecentErrMsg": 'const char *aclGetRecentErrMsg(void) { return " (qtc stub CANN library: no Ascend runtime)"; }',
    "aclrtCreateStream": "long aclrtCreateStream(void **s) { if (s) *s = handle; return 0; }",
    "aclrtCreateEvent": "long aclrtCreateEvent(void **e) { if (e) *e = handle; return 0; }",
    "aclrtMalloc": "long aclrtMalloc(void **p, size_t n, int policy) { *p = calloc(1, n ? n : 1); return *p ? 0 : 1; }",
    "aclrtMallocHost": "long aclrtMallocHost(void **p, size_t n) { *p = calloc(1, n ? n : 1); return *p ? 0 : 1; }",
    "aclrtFree": "long aclrtFree(void *p) { free(p); return 0; }",
    "aclrtFreeHost": "long aclrtFreeHost(void *p) { free(p); return 0; }",
    "aclrtMemcpy": "long aclrtMemcpy(void *d, size_t dmax, const void *s, size_t n, int kind) "
                   "{ memcpy(d, s, n < dmax ? n : dmax); return 0; }",
    "aclrtMemcpyAsync": "long aclrtMemcpyAsync(void *d, size_t dmax, const void *s, size_t n, int kind, void *st) "
                        "{ memcpy(d, s, n < dmax ? n : dmax); return 0; }",
    # ge::AscendString(const char*) and ge::Graph(const char*): each class holds one std::shared_ptr (16 bytes);
    # zero it so the inline destructors see an empty pointer.
    "_ZN2ge12AscendStringC1EPKc": "void _ZN2ge12AscendStringC1EPKc(void *self, const char *s) { memset(self, 0, 16); }",
    "_ZN2ge5GraphC1EPKc": "void _ZN2ge5GraphC1EPKc(void *self, const char *s) { memset(self, 0, 16); }",
    "_ZNK2ge12AscendStringltERKS0_": "int _ZNK2ge12AscendStringltERKS0_(const void *a, const void *b) { return 0; }",
}
_HANDLE_RETURNING = re.compile(r"^acl\w*Create\w*$")  # aclCreateDataBuffer, aclmdlCreateDesc, ...: non-null handle


def imported_cann_symbols(lib: Path) -> list[str]:
    """Undefined dynamic symbols of the provider library that no system library provides: the CANN imports.

    Versioned ones (`@GLIBC_...`, `@GLIBCXX_...`, `@GCC_...`, `@CXXABI_...`) come from libc/libstdc++, weak ones
    are optional, and `Provider_GetHost` comes from libonnxruntime_providers_shared.so.
    """
    names = []
    for line in _tool("nm", "-D", "--undefined-only", str(lib)).splitlines():
        kind, _, name = line.strip().partition(" ")
        if kind == "U" and "@" not in name and name != "Provider_GetHost":
            names.append(name.strip())
    return sorted(set(names))


def stub_source(symbols: list[str]) -> str:
    lines = ["#include <stdint.h>", "#include <stdlib.h>", "#include <string.h>", "",
             "static char handle[256];  /* what every stub 'create' call hands out */", ""]
    for name in symbols:
        if name in _SPECIAL:
            lines.append(_SPECIAL[name])
        elif _HANDLE_RETURNING.match(name):
            lines.append(f"void *{name}(void) {{ return handle; }}")
        else:
            lines.append(f"long {name}(void) {{ return 0; }}")
    return "\n".join(lines) + "\n"


def build_stubs(env: Path, out: Path) -> Path:
    """Stub CANN libraries for LD_LIBRARY_PATH. Every imported symbol is defined in libascendcl.so; the other two
    NEEDED libraries are empty (the dynamic linker resolves symbols across all loaded libraries, so which stub
    defines which symbol does not matter)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("no C compiler: apt-get update && apt-get install -y gcc")
    lib = provider_lib(env)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", _tool("readelf", "-d", str(lib)))
    missing = [n for n in needed if n.startswith(("libascend", "libacl", "libfmk", "libge", "libgraph", "libruntime"))]
    symbols = imported_cann_symbols(lib)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stub.c").write_text(stub_source(symbols))
    (out / "empty.c").write_text("/* placeholder: the symbols are all in libascendcl.so */\n")
    for name in missing:
        source = out / ("stub.c" if name == "libascendcl.so" else "empty.c")
        subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-w", f"-Wl,-soname,{name}", "-o", str(out / name),
                        str(source)], check=True)
    (out / "stubs.json").write_text(json.dumps({"provider_library": str(lib), "needed": needed, "stubbed": missing,
                                                "symbols": symbols}, indent=2) + "\n")
    print(f"{out}: {', '.join(missing)} ({len(symbols)} symbols: {sum(s.startswith('acl') for s in symbols)} acl*, "
          f"{sum(s.startswith('_ZN') for s in symbols)} ge:: C++)")
    return out


def ensure_stubs(env: Path, stubs: Path) -> Path:
    if not all((stubs / name).exists() for name in CANN_LIBS):
        build_stubs(env, stubs)
    return stubs


# ---------------------------------------------------------------------------------------------------- registry
_REGISTRY_WORKER = r"""
import importlib.metadata, json, sys
import onnxruntime
from onnxruntime.capi import _pybind_state as C
from onnx import defs
INT_MAX = 2**31 - 1
kernels = []
for k in C.get_all_opkernel_def():
    if k.provider != "CANNExecutionProvider":
        continue
    start, end = k.version_range
    kernels.append({"op_type": k.op_name, "domain": k.domain or "ai.onnx", "since_version": [start, None if end == INT_MAX else end],
                    "type_constraints": {name: sorted(types) for name, types in sorted(k.type_constraints.items())}})
kernels.sort(key=lambda k: (k["domain"], k["op_type"], k["since_version"][0], json.dumps(k["type_constraints"])))
# ONNX schema since-version of each registered op at each model opset (for the exact-since rule), from the onnx
# package in this environment.
since = {}
for op in sorted({k["op_type"] for k in kernels if k["domain"] == "ai.onnx"}):
    row = {}
    for opset in range(1, defs.onnx_opset_version() + 1):
        try:
            row[opset] = defs.get_schema(op, opset, "").since_version
        except Exception:
            pass
    since[op] = row
# Provider option defaults as the EP reads them back (a session on a one-node model; needs the stubs too), and
# what it says about an unknown option.
from onnx import helper, TensorProto
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
probe = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "p", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()
options = onnxruntime.SessionOptions()
options.log_severity_level = 3
session = onnxruntime.InferenceSession(probe, options, providers=["CANNExecutionProvider"], enable_fallback=0)
provider_options = dict(sorted(session.get_provider_options()["CANNExecutionProvider"].items()))
try:
    onnxruntime.InferenceSession(probe, options, providers=[("CANNExecutionProvider", {"no_such_option": "1"})],
                                 enable_fallback=0)
    unknown = "accepted"
except Exception as exc:
    unknown = str(exc).strip().splitlines()[-1].split("] : 1 : FAIL : ")[-1]
json.dump({"onnxruntime": onnxruntime.__version__, "provider_options": provider_options, "unknown_option": unknown, "wheel": "onnxruntime-cann==" + importlib.metadata.version("onnxruntime-cann"),
           "onnx": importlib.metadata.version("onnx"), "max_opset": defs.onnx_opset_version(), "kernels": kernels,
           "since": since}, sys.stdout)
"""


def kernel_matches(ranges: list[list], node_since: int) -> bool:
    """ORT's KernelRegistry version check: an open-ended kernel "since N" matches only nodes whose schema
    since-version is exactly N; a closed range [a, b] matches any since-version inside it."""
    for start, end in ranges:
        if start == node_since or (end is not None and start < node_since <= end):
            return True
    return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: dict) -> None:
    """Indented, but one line per kernel def and per op summary: deterministic and diffable."""
    def block(value, indent):
        if isinstance(value, dict) and indent < 2:
            items = [f'{" " * (indent + 1)}{json.dumps(k)}: {block(v, indent + 1)}' for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return "[\n" + ",\n".join(" " * (indent + 1) + json.dumps(v) for v in value) + "\n" + " " * indent + "]"
        return json.dumps(value)
    path.write_text(block(data, 0) + "\n")


def registry(env: Path, pkg: Path, stubs: Path, path: Path) -> dict:
    ensure_stubs(env, stubs)
    run = subprocess.run([env_python(env), "-c", _REGISTRY_WORKER], env=_env_vars(pkg, stubs),
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"registry dump failed:\n{run.stderr[-3000:]}")
    raw = json.loads(run.stdout)
    kernels = raw["kernels"]
    ops: dict[str, dict] = {}
    for k in kernels:
        entry = ops.setdefault(k["op_type"], {"domain": k["domain"], "since_versions": [], "types": set()})
        if k["since_version"] not in entry["since_versions"]:
            entry["since_versions"].append(k["since_version"])
        for types in k["type_constraints"].values():
            entry["types"].update(re.sub(r"^tensor\((.*)\)$", r"\1", t) for t in types)
    summary = {}
    for op, entry in sorted(ops.items()):
        ranges = sorted(entry["since_versions"], key=lambda r: r[0])
        schema = raw["since"].get(op, {})
        opsets = [int(o) for o, s in schema.items() if kernel_matches(ranges, s)]
        float_ranges = sorted({tuple(k["since_version"]) for k in kernels if k["op_type"] == op
                               and any("tensor(float)" in t for t in k["type_constraints"].values())},
                              key=lambda r: r[0])
        float_opsets = [int(o) for o, s in schema.items() if kernel_matches([list(r) for r in float_ranges], s)]
        summary[op] = {"domain": entry["domain"], "since_versions": ranges, "types": sorted(entry["types"]),
                       "matched_at_opsets": _compress(opsets), "float32_matched_at_opsets": _compress(float_opsets)}
    data = _load_json(path)
    lib = provider_lib(env)
    data.update({
        "wheel": raw["wheel"],
        "onnxruntime_version": raw["onnxruntime"],
        "provider_library": {"name": PROVIDER_LIB, "sha256": _sha256(lib)},
        "produced_by": (
            "python tools/cann_wheel_check.py registry: onnxruntime.capi._pybind_state.get_all_opkernel_def() "
            "filtered to provider CANNExecutionProvider, run in a separate venv (numpy<2, " + raw["wheel"] + ") "
            "with stub CANN libraries (tools/cann_wheel_check.py stubs) on LD_LIBRARY_PATH: without them the "
            "provider library does not load and get_all_opkernel_def() raises 'Failed to load library ... "
            "libascendcl.so'. The stubs only satisfy the loader; the registry is the wheel's own."),
        "matching_rule": (
            "ORT KernelRegistry: a kernel whose since_version is [N, null] (open-ended) matches only nodes whose ONNX "
            "schema since-version is exactly N; [a, b] matches schema since-versions a..b. matched_at_opsets "
            "applies this to the schema since-version at each model opset (onnx " + raw["onnx"] + ", opsets 1-"
            + str(raw["max_opset"]) + "); float32_matched_at_opsets only counts kernels with a tensor(float) "
            "constraint."),
        "provider_options_defaults": raw["provider_options"],
        "unknown_provider_option": raw["unknown_option"],
        "single_op_kernels": summary,
        "kernels": kernels,
    })
    data = _ordered(data)
    _write_json(path, data)
    print(f"{path}: {len(kernels)} CANN kernel defs, {len(summary)} ops ({raw['wheel']})")
    return data


def _compress(values: list[int]) -> list[list[int]]:
    """[1,2,3,7,8] -> [[1,3],[7,8]]."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return runs


_KEY_ORDER = ("wheel", "onnxruntime_version", "provider_library", "produced_by", "matching_rule",
              "provider_options_defaults", "unknown_provider_option", "graph_whitelist", "single_op_kernels",
              "kernels")


def _ordered(data: dict) -> dict:
    return {k: data[k] for k in _KEY_ORDER if k in data} | {k: v for k, v in data.items() if k not in _KEY_ORDER}


# ---------------------------------------------------------------------------------------------------- whitelist
def _load_segments(lib: Path) -> list[tuple[int, int, int]]:
    """(vaddr, offset, filesz) of each PT_LOAD segment, to turn addresses into file offsets."""
    segs = []
    for line in _tool("readelf", "-lW", str(lib)).splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            segs.append((int(parts[2], 16), int(parts[1], 16), int(parts[4], 16)))
    return segs


def _c_string(blob: bytes, segs, vaddr: int) -> str | None:
    for base, offset, size in segs:
        if base <= vaddr < base + size:
            start = offset + vaddr - base
            return blob[start:blob.index(b"\0", start)].decode("ascii", "replace")
    return None


def graph_whitelist(env: Path, path: Path) -> dict:
    """The op whitelist of onnxruntime::cann::SupportONNXModel() in the wheel's provider library.

    Source (cann_graph.cc): `static std::set<std::string> cann_supported_ops = {"Abs", ...}`. GCC emits the
    initializer list as a static array of `const char*` (a local symbol `C.<n>.<m>` in .data.rel.ro, filled by
    R_X86_64_RELATIVE relocations) that the function's one-time initializer walks. So: disassemble
    SupportONNXModel, take the `C.*` array it loads, and resolve each of its relocated pointers to its string.
    A plain `strings` scan is not enough: the linker tail-merges string literals, so "Max" is stored inside
    "ArgMax", "Relu" inside "PRelu", "Transpose" inside "ConvTranspose" and so on.
    """
    lib = provider_lib(env)
    blob = lib.read_bytes()
    segs = _load_segments(lib)
    symbols = {}
    for line in _tool("nm", "-S", "--defined-only", str(lib)).splitlines():
        parts = line.split()
        if len(parts) == 4:
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    func = next(name for name in symbols if name.startswith("_ZN11onnxruntime4cann16SupportONNXModel"))
    start, size = symbols[func]
    disasm = _tool("objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
                   f"--stop-address={start + size:#x}", str(lib))
    arrays = sorted(set(re.findall(r"lea\s+0x[0-9a-f]+\(%rip\),%\w+\s+# [0-9a-f]+ <(C\.\d+\.\d+)>", disasm)))
    relocs = {}
    for line in _tool("readelf", "-rW", str(lib)).splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] == "R_X86_64_RELATIVE":
            relocs[int(parts[0], 16)] = int(parts[3], 16)
    found = []
    for name in arrays:
        base, nbytes = symbols[name]
        names = [_c_string(blob, segs, relocs[base + i]) for i in range(0, nbytes, 8) if base + i in relocs]
        if names and all(n and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", n) for n in names):
            found.append((name, base, nbytes, names))
    if len(found) != 1:
        raise SystemExit(f"expected one op-name array referenced by {func}, found {[f[0] for f in found]}")
    array, base, nbytes, ops = found[0]
    complete = len(ops) * 8 == nbytes
    # The opset check in the same function: `cmp $0x7,%e..; setle` = "domain_version <= 7 -> unsupported".
    bounds = re.findall(r"cmp\s+\$0x([0-9a-f]+),%e\w+\s*\n\s*[0-9a-f]+:\s+set(le|l|g|ge)", disasm)
    # What a `strings` scan near the table finds, for comparison: the contiguous run of names in .rodata.
    table = {n for n in _strings_run(blob, _file_offset(segs, relocs[base]))}
    result = {
        "ops": sorted(ops),
        "count": len(ops),
        "complete": complete,
        "opset_check": [f"cmp ${int(v, 16)} then set{cond}" for v, cond in bounds],
        "opset_lower_bound": int(bounds[0][0], 16) + 1 if bounds and bounds[0][1] == "le" else None,
        "method": (
            f"tools/cann_wheel_check.py graph-whitelist: objdump of {func} (onnxruntime::cann::SupportONNXModel) "
            f"finds the static initializer-list array {array} ({nbytes} bytes = {nbytes // 8} pointers in "
            ".data.rel.ro) that fills the function's static std::set<std::string> cann_supported_ops; each pointer's "
            "R_X86_64_RELATIVE relocation (readelf -r) gives the string's address in .rodata. The opset check is "
            "the `cmp $0x7` + setle on the domain version in the same function. A `strings -n 2` scan of the "
            "name table alone misses the names the linker tail-merged into longer ones (listed in "
            "not_in_strings_scan)."),
        "not_in_strings_scan": sorted(set(ops) - table),
    }
    data = _load_json(path)
    data["graph_whitelist"] = result
    data.setdefault("provider_library", {"name": PROVIDER_LIB, "sha256": _sha256(lib)})
    _write_json(path, _ordered(data))
    print(f"{path}: graph whitelist of {len(ops)} ops (complete={complete}), opset lower bound "
          f"{result['opset_lower_bound']}; a strings scan alone misses {len(result['not_in_strings_scan'])}")
    return result


def _file_offset(segs, vaddr: int) -> int:
    for base, offset, size in segs:
        if base <= vaddr < base + size:
            return offset + vaddr - base
    raise ValueError(hex(vaddr))


def _strings_run(blob: bytes, offset: int) -> list[str]:
    """The NUL-separated identifier strings stored contiguously from `offset` on (the first table entry)."""
    names = []
    while True:
        end = blob.index(b"\0", offset)
        word = blob[offset:end].decode("ascii", "replace")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", word):
            return names
        names.append(word)
        offset = end + 1


# ---------------------------------------------------------------------------------------------------- probe
_PROBE_MODEL = r"""
import sys
import numpy as np, onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh
opset, out = int(sys.argv[1]), sys.argv[2]
rng = np.random.RandomState(0)
inits = [nh.from_array(rng.randn(8, 8).astype(np.float32), "W"), nh.from_array(np.ones(8, np.float32), "gamma"),
         nh.from_array(np.zeros(8, np.float32), "beta"), nh.from_array(np.array(0.05, np.float32), "scale"),
         nh.from_array(np.array(0, np.int8), "zero"), nh.from_array(np.array([2, 4, 8], np.int64), "shape")]
nodes = [
    h.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"], name="quantize"),
    h.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"], name="dequantize"),
    h.make_node("MatMul", ["xd", "W"], ["mm"], name="matmul"),
    h.make_node("Add", ["mm", "beta"], ["ad"], name="add"),
    h.make_node("LayerNormalization", ["ad", "gamma", "beta"], ["ln"], name="layernorm", axis=-1) if opset >= 17
    else h.make_node("Sigmoid", ["ad"], ["ln"], name="sigmoid"),
    h.make_node("Gelu", ["ln"], ["ge"], name="gelu") if opset >= 20 else h.make_node("Erf", ["ln"], ["ge"], name="erf"),
    h.make_node("Neg", ["beta"], ["negbeta"], name="neg_of_initializer"),  # all inputs initializers
    h.make_node("Sub", ["ge", "negbeta"], ["gb"], name="sub"),
    h.make_node("Mul", ["gb", "ad"], ["mu"], name="mul"),
    h.make_node("Softmax", ["mu"], ["sm"], name="softmax", axis=-1),
    h.make_node("Reshape", ["sm", "shape"], ["rs"], name="reshape"),
    h.make_node("Transpose", ["rs"], ["y"], name="transpose", perm=[1, 0, 2]),
]
graph = h.make_graph(nodes, f"probe{opset}", [h.make_tensor_value_info("x", T.FLOAT, [8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4, 2, 8])], inits)
model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=9)
onnx.checker.check_model(model, full_check=True)
onnx.save(model, out)
print(" ".join(f"{n.op_type}({n.name})" for n in model.graph.node))
"""

_PROBE_SESSION = r"""
import json, sys
import numpy as np, onnxruntime as ort
path, graph_mode, subgraph, optimize = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
options = ort.SessionOptions()
options.log_severity_level = 0
options.log_verbosity_level = 1
if not optimize:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
cann = {"enable_cann_graph": graph_mode, "enable_cann_subgraph": subgraph, "dump_graphs": "1",
        "dump_om_model": "0", "precision_mode": "must_keep_origin_dtype"}
# enable_fallback=0: the Python wrapper must not silently retry on CPU if the CANN EP cannot be created.
session = ort.InferenceSession(path, options, providers=[("CANNExecutionProvider", cann), "CPUExecutionProvider"],
                               enable_fallback=0)
print("SESSION-PROVIDERS " + json.dumps(session.get_providers()), flush=True)
out = session.run(None, {"x": np.ones((8, 8), np.float32)})
print("RUN-OK " + json.dumps({"shape": list(out[0].shape), "sum_abs": float(np.abs(out[0]).sum()),
                              "finite": bool(np.isfinite(out[0]).all())}), flush=True)
"""

MODES = {  # label -> (enable_cann_graph, enable_cann_subgraph)
    "graph (whole model, default)": ("1", "0"),
    "graph + subgraph (whitelist partition)": ("1", "1"),
    "single-op (kernel registry)": ("0", "0"),
}


def _placements(log: str) -> dict[str, list[str]]:
    """`Node placements` of ORT's verbose session log: EP -> ["OpType (node name)", ...]."""
    placed: dict[str, list[str]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if m:
            current = m.group(1)
            placed.setdefault(current, [])
            if "All nodes placed" in line:  # ORT lists no node names in this case
                placed[current].append(f"<all {m.group(2)} node(s)>")
            continue
        m = re.search(r"VerifyEachNodeIsAssignedToAnEp\]\s{3,}(.+)$", line)
        if m and current:
            placed[current].append(m.group(1).strip())
        elif current and "VerifyEachNodeIsAssignedToAnEp" not in line:
            current = None
    return placed


def probe(env: Path, pkg: Path, stubs: Path, out: Path, opsets=(13, 17, 20)) -> dict:
    """Which probe-model nodes the CANN EP claims, per mode, with the stub libraries (no device)."""
    ensure_stubs(env, stubs)
    results = {"note": "stub CANN libraries on LD_LIBRARY_PATH: session creation and partitioning are the wheel's "
                       "own; anything that runs afterwards talks to stubs (a fake device) and proves nothing",
               "wheel": WHEEL, "models": {}}
    with tempfile.TemporaryDirectory(prefix="cann-probe-") as tmp:
        for opset in opsets:
            model = Path(tmp) / f"probe_opset{opset}.onnx"
            made = subprocess.run([env_python(env), "-c", _PROBE_MODEL, str(opset), str(model)],
                                  capture_output=True, text=True, check=True)
            entry = {"nodes": made.stdout.split(), "runs": {}}
            for label, (graph_mode, subgraph) in MODES.items():
                for optimize in (True, False):
                    cwd = Path(tmp) / f"o{opset}-g{graph_mode}s{subgraph}-opt{int(optimize)}"
                    cwd.mkdir()
                    run = subprocess.run([env_python(env), "-c", _PROBE_SESSION, str(model), graph_mode, subgraph,
                                          "1" if optimize else "0"], env=_env_vars(pkg, stubs), cwd=cwd,
                                         capture_output=True, text=True, timeout=300)
                    log = run.stdout + run.stderr
                    fused = {}
                    for f in sorted(cwd.glob("CANNExecutionProvider_*.onnx")):
                        fused[f.stem] = _node_list(env, f)
                    session_line = next((l for l in log.splitlines() if l.startswith("SESSION-PROVIDERS")), None)
                    run_line = next((l for l in log.splitlines() if l.startswith("RUN-OK")), None)
                    errors = [re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in log.splitlines()
                              if ("[E:" in l or "Error" in l or "Exception" in l) and "GraphTransformer" not in l]
                    key = f"{label}; {'ORT_ENABLE_ALL' if optimize else 'ORT_DISABLE_ALL'}"
                    entry["runs"][key] = {
                        "provider_options": {"enable_cann_graph": graph_mode, "enable_cann_subgraph": subgraph},
                        "session_created": session_line is not None,
                        "placements": _placements(log),
                        "fused_cann_subgraphs": fused,
                        "run": (json.loads(run_line.split(" ", 1)[1]) if run_line else
                                f"failed (exit {run.returncode}{', SIGSEGV' if run.returncode in (-11, 139) else ''})"),
                        "errors": errors[-4:],
                    }
                    print(f"opset {opset:2d} | {key:60s} | created={session_line is not None} | "
                          f"CANN: {', '.join(n.split(' ')[0] for n in entry['runs'][key]['placements'].get('CANNExecutionProvider', []))}"
                          f" | run: {'ok' if run_line else 'exit ' + str(run.returncode)}")
            results["models"][f"opset{opset}"] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return results


def _node_list(env: Path, model: Path) -> list[str]:
    code = ("import onnx, sys; m = onnx.load(sys.argv[1]); "
            "print(' '.join(f'{n.op_type}({n.name})' for n in m.graph.node))")
    return subprocess.run([env_python(env), "-c", code, str(model)], capture_output=True, text=True).stdout.split()


# ---------------------------------------------------------------------------------------------------- parity
def parity(env: Path, pkg: Path, stubs: Path, model: Path, inputs: str, samples: int, out: Path) -> dict:
    """`qtc parity MODEL --backends cpu,cann --json` in the CANN environment, without and with the stubs."""
    ensure_stubs(env, stubs)
    report = {}
    for label, lib_path in (("no Ascend libraries", None), ("stub CANN libraries (fake device)", stubs)):
        cmd = [str(env_python(env)), "-m", "qtc.cli.main", "parity", str(model), "--backends", "cpu,cann",
               "--inputs", inputs, "--samples", str(samples), "--json"]
        with tempfile.TemporaryDirectory(prefix="cann-parity-") as cwd:  # dump_om_model writes into the cwd
            run = subprocess.run(cmd, env=_env_vars(pkg, lib_path), cwd=cwd, capture_output=True, text=True,
                                 timeout=600)
        try:
            parsed = json.loads(run.stdout)
            stdout_is_json = True
        except json.JSONDecodeError:
            start = run.stdout.find("{\n")
            parsed = json.loads(run.stdout[start:]) if start >= 0 else None
            stdout_is_json = False
        cann = (parsed or {}).get("backends", {}).get("cann", {})
        report[label] = {
            "command": "qtc " + " ".join(cmd[3:]) + (f"  (LD_LIBRARY_PATH={lib_path})" if lib_path else ""),
            "exit_code": run.returncode,
            "stdout_is_valid_json": stdout_is_json,
            "stdout_before_json": run.stdout[:run.stdout.find("{\n")] if not stdout_is_json else "",
            "stderr_tail": run.stderr[-2000:],
            "cann": cann,
            "cann_has_numbers": "outputs" in cann,
            "result": parsed,
        }
        print(f"[{label}] exit {run.returncode}; stdout valid JSON: {stdout_is_json}; cann available="
              f"{cann.get('available')} numbers={'outputs' in cann}; reason: {cann.get('reason')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    commands = {name: sub.add_parser(name) for name in
                ("setup", "stubs", "registry", "graph-whitelist", "probe", "parity", "all")}
    for name, p in commands.items():
        p.add_argument("--env", type=Path, default=DEFAULT_ENV, help="the CANN virtual environment")
        p.add_argument("--pkg", type=Path, default=DEFAULT_PKG, help="folder with qtc -> this repo, for PYTHONPATH")
        p.add_argument("--stubs", type=Path, default=DEFAULT_STUBS, help="stub CANN library folder")
        p.add_argument("--json", type=Path, default=KERNELS_JSON, help="the kernel/whitelist JSON to write")
        if name in ("parity", "all"):
            p.add_argument("--model", type=Path, required=name == "parity")
            p.add_argument("--inputs", default="zh-news")
            p.add_argument("--samples", type=int, default=2)
    commands["stubs"].add_argument("--out", type=Path, help="same as --stubs")
    commands["probe"].add_argument("--out", type=Path, default=RESULTS / "cann_probe.json")
    commands["parity"].add_argument("--out", type=Path, default=RESULTS / "cann_parity.json")
    args = parser.parse_args(argv)
    if args.cmd == "setup":
        setup(args.env, args.pkg)
    elif args.cmd == "stubs":
        build_stubs(args.env, args.out or args.stubs)
    elif args.cmd == "registry":
        registry(args.env, args.pkg, args.stubs, args.json)
    elif args.cmd == "graph-whitelist":
        graph_whitelist(args.env, args.json)
    elif args.cmd == "probe":
        probe(args.env, args.pkg, args.stubs, args.out)
    elif args.cmd == "parity":
        parity(args.env, args.pkg, args.stubs, args.model, args.inputs, args.samples, RESULTS / "cann_parity.json"
               if args.out is None else args.out)
    elif args.cmd == "all":
        setup(args.env, args.pkg)
        build_stubs(args.env, args.stubs)
        registry(args.env, args.pkg, args.stubs, args.json)
        graph_whitelist(args.env, args.json)
        probe(args.env, args.pkg, args.stubs, RESULTS / "cann_probe.json")
        if args.model:
            parity(args.env, args.pkg, args.stubs, args.model, args.inputs, args.samples, RESULTS / "cann_parity.json")


if __name__ == "__main__":
    main()
