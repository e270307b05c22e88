"""Recipes are data: frozen, validated dataclasses parsed from built-in or user YAML with one schema.

A recipe says *what* to quantize and *how*; passes decide nothing on their own. Per node, settings resolve in
this order, each later level overriding the earlier (documented precedence):

    global (weight / activation / op_types / keep_float)  <  op_type rules  <  name-glob rules  <  node rules

Within one level, later rules win. A name glob matches the node's name, its weight initializer's name (or the name that weight was
constant-folded from) or the module path the exporter recorded, e.g. ``model.layers.0.mlp.down_proj``.

Roles kept in float by default (`keep_float`), and why:
- ``embedding``: the token-embedding Gather. It is a table lookup, not arithmetic, and Gather is not in
  `op_types`; the recipe key ``embedding: {dtype: int4, granularity: block, block_size: 32}`` quantizes the
  table instead (blocks along the hidden axis, weight-only), which takes it out of `keep_float`.
- ``lm_head``: the final projection to the vocabulary. Its output is the logits, where quantization error goes
  straight into every token's probability. A rule with ``quantize: true`` can still turn it on. In tied models
  its weight *is* the embedding table: with ``embedding`` set the head reads the same quantized table (one
  copy, weight-only; the table's blocks run along hidden, the head's reduction axis), whatever the rules say.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from qtc.calibration.observers import CALIBRATORS
from qtc.errors import QtcError

FLOAT_DTYPES = ("float8e4m3fn",)  # ONNX FLOAT8E4M3FN: symmetric only, per tensor or per channel
WEIGHT_DTYPES = ("int8", "uint8", "int4", "uint4", *FLOAT_DTYPES)
ACTIVATION_DTYPES = ("int8", "uint8", *FLOAT_DTYPES)
GRANULARITIES = ("tensor", "channel", "block")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("rtn", "gptq", "awq")
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
ROLES = ("embedding", "lm_head")
SELECTORS = ("op_type", "name", "node")
TABLE_GRANULARITIES = ("block", "channel")  # per block along hidden, or one scale per row (token)


class _Inherit:
    """Marks a rule field that is not set, as distinct from `None` (= turn activations off)."""

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Any = _Inherit()


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. `calibrator` is for activations only; `block_size` for block granularity,
    where blocks run along the reduction axis (K of a MatMul weight [K, N]), one scale per block and column."""

    dtype: str = "int8"
    granularity: str = "tensor"
    symmetric: bool = True
    calibrator: str | None = None
    percentile: float = 99.999
    block_size: int | None = None
    algorithm: str = "rtn"  # weights: round-to-nearest, GPTQ (error feedback), or AWQ (scale + clip search)
    damping: float = 0.01  # GPTQ: fraction of mean diag(H) added to the diagonal
    act_order: bool = False  # GPTQ: quantize input channels in order of decreasing activation energy
    # GPTQ: each layer's statistics from what the already quantized layers before it compute (the calibration
    # graph runs segment by segment, each segment re-run with its rounded weights), not from the float model
    sequential: bool = False
    dynamic: bool = False  # activations: quantized at run time (per block of K, by the kernel), not calibrated

    def __post_init__(self) -> None:
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        if not 0.0 < self.damping < 1.0:
            raise QtcError(f"damping must be in (0, 1), got {self.damping}")
        _check_choice("dtype", self.dtype, WEIGHT_DTYPES)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        if self.granularity == "block":
            _check_choice("block_size", self.block_size, BLOCK_SIZES)
        elif self.block_size is not None:
            raise QtcError(f"block_size is only for granularity: block (got granularity {self.granularity})")
        if self.calibrator is not None:
            _check_choice("calibrator", self.calibrator, CALIBRATORS)
        if not 50.0 < self.percentile <= 100.0:
            raise QtcError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.sequential and self.algorithm != "gptq":
            raise QtcError(f"sequential is a GPTQ option (algorithm: gptq), got algorithm: {self.algorithm}")
        if self.dtype in FLOAT_DTYPES and (not self.symmetric or self.granularity == "block" or self.algorithm != "rtn"):
            raise QtcError(f"{self.dtype} is symmetric, per tensor or per channel, rounded to nearest "
                           "(no zero point, blocks or GPTQ/AWQ)")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if self.calibrator != "percentile":
            data.pop("percentile")
        if self.calibrator is None:
            data.pop("calibrator")
        if self.block_size is None:
            data.pop("block_size")
        if self.algorithm != "gptq":
            data.pop("damping")
            data.pop("act_order")
        if not self.sequential:
            data.pop("sequential")
        if not self.dynamic:
            data.pop("dynamic")
        return data


@dataclass(frozen=True)
class SmoothSpec:
    """SmoothQuant: migrate activation outliers into the weights, s_j = max|X_j|^alpha / max|W_j|^(1-alpha).
    `alpha: auto` picks alpha per activation from a grid by the predicted output error."""

    alpha: float | str = 0.5

    def __post_init__(self) -> None:
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise QtcError(f"smooth.alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")

    def to_dict(self) -> dict:
        return {"alpha": self.alpha}


@dataclass(frozen=True)
class Rule:
    """One override: a selector (`op_type`, `name` glob or `node` name) and the settings it changes."""

    selector: str
    pattern: str
    quantize: bool | None = None
    weight: Any = INHERIT
    activation: Any = INHERIT

    def matches(self, node_name: str, op_type: str, names: tuple[str, ...]) -> bool:
        if self.selector == "op_type":
            return op_type == self.pattern
        if self.selector == "node":
            return node_name == self.pattern
        return any(fnmatch.fnmatchcase(name, self.pattern) for name in (node_name, *names))

    def to_dict(self) -> dict:
        data: dict[str, Any] = {self.selector: self.pattern}
        if self.quantize is not None:
            data["quantize"] = self.quantize
        for key in ("weight", "activation"):
            value = getattr(self, key)
            if value is not INHERIT:
                data[key] = value.to_dict() if value is not None else None
        return data


@dataclass(frozen=True)
class NodeQuant:
    """The resolved decision for one node: its weight spec and, unless weight-only, its activation spec."""

    weight: QuantSpec
    activation: QuantSpec | None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    weight: QuantSpec
    activation: QuantSpec | None
    op_types: tuple[str, ...] = QUANTIZABLE_OPS
    keep_float: tuple[str, ...] = ROLES
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    opset: int = 21
    smooth: SmoothSpec | None = None
    embedding: QuantSpec | None = None  # the embedding table (and a head tied to it); None keeps it float
    rotate: str | None = None  # "hadamard": rotate the residual stream first (passes/rotate.py)

    def __post_init__(self) -> None:
        for op in self.op_types:
            _check_choice("op_types entry", op, QUANTIZABLE_OPS)
        for role in self.keep_float:
            _check_choice("keep_float entry", role, ROLES)
        if self.embedding is not None:
            _check_table(self.name, self.embedding, self.keep_float)
        if self.rotate is not None:
            _check_choice("rotate", self.rotate, ROTATIONS)
        activations = [self.activation] + [r.activation for r in self.rules if r.activation not in (INHERIT, None)]
        for spec in filter(None, activations):
            _check_activation(self.name, spec)

    @property
    def needs_calibration(self) -> bool:
        """Static activations, smoothing, and data-driven rounding all need real calibration data."""
        specs = [self.weight] + [r.weight for r in self.rules if r.weight is not INHERIT]
        return (
            (self.activation is not None and not self.activation.dynamic)
            or self.smooth is not None
            or any(spec.algorithm != "rtn" for spec in specs)
            or any(r.activation not in (INHERIT, None) for r in self.rules)
        )

    def resolve(
        self, node_name: str, op_type: str, names: tuple[str, ...] = (), role: str | None = None, tied: bool = False
    ) -> NodeQuant | None:
        """The settings for one node, or None when it stays in float.

        `names` are the other names a glob may match: the weight's name, the name it was folded from, and the
        module path the exporter recorded (e.g. ``model.layers.0.mlp.down_proj``). `tied`: the node reads the
        embedding table (a tied LM head); with `embedding` set it follows the table, not the rules.
        """
        if self.embedding is not None and (role == "embedding" or tied):
            return NodeQuant(self.embedding, None)  # one table, one quantization, weight-only for both readers
        quantize = op_type in self.op_types and role not in self.keep_float
        weight, activation = self.weight, self.activation
        for selector in SELECTORS:
            for rule in self.rules:
                if rule.selector != selector or not rule.matches(node_name, op_type, names):
                    continue
                if rule.quantize is not None:
                    quantize = rule.quantize
                if rule.weight is not INHERIT:
                    weight = rule.weight
                if rule.activation is not INHERIT:
                    activation = rule.activation
        if not quantize or op_type not in QUANTIZABLE_OPS:
            return None
        return NodeQuant(weight, activation)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict() if self.activation else None,
            "op_types": list(self.op_types),
            "keep_float": list(self.keep_float),
            "overrides": [r.to_dict() for r in self.rules],
            "opset": self.opset,
            "smooth": self.smooth.to_dict() if self.smooth else None,
            "embedding": self.embedding.to_dict() if self.embedding else None,
            **({"rotate": self.rotate} if self.rotate else {}),  # absent when off: older provenance reads the same
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    def with_calibrator(self, calibrator: str | None) -> Recipe:
        """The same recipe with the activation calibrator replaced (the CLI's --calibrator)."""
        if calibrator is None or self.activation is None:
            return self
        return dataclasses.replace(self, activation=dataclasses.replace(self.activation, calibrator=calibrator))


# ---------------------------------------------------------------------------------------------- parsing

RECIPE_KEYS = ("name", "description", "base", "weight", "activation", "op_types", "keep_float", "overrides", "opset",
               "smooth", "embedding", "rotate")
ROTATIONS = ("hadamard",)
SPEC_KEYS = tuple(f.name for f in dataclasses.fields(QuantSpec))
RULE_KEYS = (*SELECTORS, "quantize", "weight", "activation", "recipe")


def _check_choice(what: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise QtcError(f"unknown {what} {value!r} (choose from {', '.join(map(str, choices))})")


def _check_activation(recipe: str, spec: QuantSpec) -> None:
    if spec.dynamic:
        if spec.calibrator is not None or spec.dtype != "int8":
            raise QtcError(f"recipe '{recipe}': dynamic activations are int8, quantized at run time (no calibrator)")
        return
    if spec.calibrator is None:
        raise QtcError(f"recipe '{recipe}': activation needs a calibrator ({', '.join(CALIBRATORS)})")
    if spec.dtype not in ACTIVATION_DTYPES or spec.granularity != "tensor":
        raise QtcError(f"recipe '{recipe}': activations are quantized per tensor to {' or '.join(ACTIVATION_DTYPES)}")


def _check_table(recipe: str, spec: QuantSpec, keep_float: tuple[str, ...]) -> None:
    where = f"recipe '{recipe}': embedding"
    if spec.granularity not in TABLE_GRANULARITIES:
        raise QtcError(f"{where}: granularity must be {' or '.join(TABLE_GRANULARITIES)}, got {spec.granularity!r}")
    if spec.algorithm not in ("rtn", "gptq") or spec.calibrator is not None:
        raise QtcError(f"{where}: the table is weight-only (no calibrator), rounded to nearest (rtn) or by GPTQ "
                       "against a tied head's input statistics (gptq)")
    if "embedding" in keep_float:
        raise QtcError(f"{where}: is set, but keep_float lists embedding (drop one of the two)")


def _check_keys(where: str, data: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(data, dict):
        raise QtcError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise QtcError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    return data


def _spec(where: str, data: Any, base: QuantSpec | None) -> QuantSpec | None:
    if data is None:
        return None
    _check_keys(where, data, SPEC_KEYS)
    merged = {**(base.to_dict() if base else {}), **data}
    try:
        return QuantSpec(**merged)
    except TypeError as exc:
        raise QtcError(f"{where}: {exc}") from None


def _rule(where: str, data: Any) -> Rule:
    _check_keys(where, data, RULE_KEYS)
    selectors = [s for s in SELECTORS if s in data]
    if len(selectors) != 1:
        raise QtcError(f"{where}: name exactly one of {', '.join(SELECTORS)}")
    selector = selectors[0]
    weight, activation = INHERIT, INHERIT
    if "recipe" in data:
        preset = builtin_recipe(data["recipe"])
        weight, activation = preset.weight, preset.activation
    if "weight" in data:
        weight = _spec(f"{where}.weight", data["weight"], None if weight is INHERIT else weight)
        if weight is None:
            raise QtcError(f"{where}.weight: cannot be null (use quantize: false to keep a node in float)")
    if "activation" in data:
        activation = _spec(f"{where}.activation", data["activation"], None if activation is INHERIT else activation)
    quantize = data.get("quantize")
    if quantize is not None and not isinstance(quantize, bool):
        raise QtcError(f"{where}.quantize: expected true or false")
    return Rule(selector, str(data[selector]), quantize, weight, activation)


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """Validate a recipe mapping (from YAML) into a Recipe. Unknown keys are errors."""
    _check_keys(where, data, RECIPE_KEYS)
    base = builtin_recipe(data["base"]) if "base" in data else None
    if base is None and "weight" not in data:
        raise QtcError(f"{where}: needs 'weight' (or 'base: <built-in recipe>')")
    name = data.get("name") or (base.name if base else None)
    if not name:
        raise QtcError(f"{where}: needs a 'name'")
    weight = _spec(f"{where}.weight", data.get("weight", {}), base.weight if base else None)
    if weight is None:
        raise QtcError(f"{where}.weight: cannot be null")
    activation = base.activation if base else None
    if "activation" in data:
        activation = _spec(f"{where}.activation", data["activation"], activation)
    overrides = data.get("overrides", [])
    if not isinstance(overrides, list):
        raise QtcError(f"{where}.overrides: expected a list")
    rules = tuple(_rule(f"{where}.overrides[{i}]", r) for i, r in enumerate(overrides))
    embedding = base.embedding if base else None
    if "embedding" in data:
        embedding = _spec(f"{where}.embedding", data["embedding"], None)
    keep_float = tuple(data.get("keep_float", base.keep_float if base else ROLES))
    if embedding is not None and "keep_float" not in data:
        keep_float = tuple(role for role in keep_float if role != "embedding")  # setting the table says it all
    return Recipe(
        name=str(name),
        description=str(data.get("description", base.description if base else "")).strip(),
        weight=weight,
        activation=activation,
        op_types=tuple(data.get("op_types", base.op_types if base else QUANTIZABLE_OPS)),
        keep_float=keep_float,
        rules=(base.rules if base else ()) + rules,
        opset=int(data.get("opset", base.opset if base else 21)),
        smooth=_smooth(where, data["smooth"]) if "smooth" in data else (base.smooth if base else None),
        embedding=embedding,
        rotate=data.get("rotate", base.rotate if base else None),
    )


def _smooth(where: str, data: Any) -> SmoothSpec | None:
    if data is None:
        return None
    _check_keys(f"{where}.smooth", data, ("alpha",))
    return SmoothSpec(**data)


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise QtcError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None


def builtin_names() -> list[str]:
    folder = resources.files("qtc.recipes") / "builtin"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_recipe(name: str) -> Recipe:
    if name not in builtin_names():
        raise QtcError(f"unknown recipe {name!r} (built-ins: {', '.join(builtin_names())}; or a .yaml file)")
    text = (resources.files("qtc.recipes") / "builtin" / f"{name}.yaml").read_text(encoding="utf-8")
    return parse_recipe(_read_yaml(text, f"recipe {name}"), f"recipe {name}")


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """A built-in recipe by name, a YAML file by path, or a Recipe as it is."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise QtcError(f"recipe file not found: {path}")
        return parse_recipe(_read_yaml(path.read_text(encoding="utf-8"), path.name), path.name)
    return builtin_recipe(text)
