"""String options of the CLI turned into values: budgets, --max-drop, --tolerance, --feed, lists. Each bad value
is a QtcError naming the option (exit 2)."""

from __future__ import annotations

from pathlib import Path

from qtc.errors import QtcError
from qtc.measure.mixed_precision import METRICS
from qtc.passes.layerskip import LayerSkipSpec

TOLERANCE_KEYS = ("cosine", "top1_agreement")


def _number(text: str, option: str, form: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise QtcError(f"{option} takes {form} (got {text!r})") from None


def parse_budgets(text: str) -> tuple[float, ...]:
    """'1.0,0.9,0.8' -> (1.0, 0.9, 0.8): the budget levels of --layer-skip and `qtc sweep`, each in (0, 1]."""
    try:
        budgets = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        budgets = ()
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise QtcError(f"--budgets takes comma-separated numbers in (0, 1], e.g. 1.0,0.9,0.8 (got {text!r})")
    return budgets


def parse_max_drop(text: str) -> tuple[str, float]:
    """'top1=0.02' -> ('top1', 0.02)."""
    name, _, value = text.partition("=")
    if name not in METRICS or not value:
        raise QtcError(f"--max-drop takes METRIC=VALUE with METRIC one of {', '.join(METRICS)} (got {text!r})")
    return name, _number(value, "--max-drop", "METRIC=NUMBER")


def parse_tolerance(text: str) -> dict[str, float]:
    """'cosine=0.999,top1_agreement=0.95' -> bounds by name."""
    bound = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in TOLERANCE_KEYS or not value:
            raise QtcError(f"--tolerance takes cosine=X,top1_agreement=Y (got {item!r})")
        bound[key] = _number(value, "--tolerance", "cosine=X,top1_agreement=Y")
    return bound


def parse_feeds(items: tuple[str, ...]) -> dict[str, float]:
    """('budget=0.8', ...) -> scalar inputs fed to every run."""
    feeds = {}
    for item in items:
        name, _, value = item.partition("=")
        feeds[name.strip()] = _number(value, "--feed", "NAME=NUMBER")
    return feeds


def parse_list(text: str) -> list[str]:
    """'cpu, cuda' -> ['cpu', 'cuda']."""
    return [item.strip() for item in text.split(",") if item.strip()]


def layer_skip_spec(enabled: bool, budgets: str | None, metric: str | None, unit: str | None,
                    table_from: Path | None) -> LayerSkipSpec | None:
    """The --layer-skip options as one spec (None without --layer-skip, whose companions then are errors)."""
    if not enabled:
        if budgets or metric or unit or table_from:
            raise QtcError("--budgets, --skip-metric, --budget-unit and --skip-table-from need --layer-skip")
        return None
    spec = LayerSkipSpec()
    return LayerSkipSpec(budgets=parse_budgets(budgets) if budgets else spec.budgets, metric=metric or spec.metric,
                         unit=unit or spec.unit, table_from=table_from)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | None, option: str) -> int | None:
    """'6GB', '6000MB', '6GiB', '500000000' -> bytes (None passes through)."""
    if text is None:
        return None
    stripped = text.strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGIB")
    unit = stripped[len(number):]
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        value = 0
    if value < 1 << 20:
        raise QtcError(f"{option} takes a size of at least 1 MiB, e.g. 6GB or 6000MB (got {text!r})")
    return int(value)
