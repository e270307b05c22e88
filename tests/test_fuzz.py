"""Fuzzing (hypothesis): recipes, option strings and damaged model files end in a value or a QtcError (exit 2),
never another exception (a traceback, exit 1). 1,000 cases each; seeded, so CI runs the same cases every time."""

import random

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qtc
from qtc.cli.options import layer_skip_spec, parse_budgets, parse_feeds, parse_list, parse_max_drop, parse_tolerance
from qtc.errors import QtcError
from qtc.recipes import RECIPE_KEYS, RULE_KEYS, SPEC_KEYS, builtin_names, load_recipe, parse_recipe
from tests import graphs

CASES = settings(max_examples=1000, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
KEYS = st.sampled_from(sorted({*RECIPE_KEYS, *SPEC_KEYS, *RULE_KEYS, "junk", "alpha"}))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=True),
                    st.sampled_from([*builtin_names(), "int4", "int8", "uint8", "block", "channel", "tensor", "gptq",
                                     "awq", "rtn", "minmax", "mse", "auto", "*down_proj*", "MatMul", "lm_head"]),
                    st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


def _value_or_qtc_error(call, *args):
    try:
        return call(*args)
    except QtcError:
        return None


@CASES
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_recipe_mappings(data):
    _value_or_qtc_error(parse_recipe, data)


@CASES
@given(st.text(max_size=200))
def test_recipe_yaml_text(text):
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    _value_or_qtc_error(parse_recipe, data)


OPTION_TEXT = st.one_of(st.text(max_size=30), st.from_regex(r"[a-z_0-9]{0,12}=[-0-9.e,x]{0,10}(,[a-z]{0,8}=[0-9.]{0,5})?",
                                                             fullmatch=True))


@CASES
@given(OPTION_TEXT, st.lists(OPTION_TEXT, max_size=3), st.sampled_from([None, "bi", "loss", "x"]))
def test_option_strings(text, items, metric):
    for parse in (parse_budgets, parse_max_drop, parse_tolerance, parse_list):
        _value_or_qtc_error(parse, text)
    _value_or_qtc_error(parse_feeds, tuple(items))
    _value_or_qtc_error(layer_skip_spec, True, text or None, metric, None, None)
    _value_or_qtc_error(load_recipe, text)


def _damaged(source: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(source)
    if seed % 3 == 0:
        return bytes(data[: rng.randrange(len(data))])  # truncated
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)  # flipped bytes
    return bytes(data)


def test_damaged_model_files(tmp_path):
    """1,000 truncated or byte-flipped copies of a real (small) model: compiled, or refused in one QtcError."""
    source = tmp_path / "source.onnx"
    import onnx_ir as ir

    ir.save(graphs.mlp(), source)
    original = source.read_bytes()
    outcomes = {"compiled": 0, "refused": 0}
    for seed in range(1000):
        path = tmp_path / "damaged.onnx"
        path.write_bytes(_damaged(original, seed))
        try:
            qtc.compile(path, recipe="w8a16", quiet=True, compare=False)
            outcomes["compiled"] += 1
        except QtcError:
            outcomes["refused"] += 1
    assert sum(outcomes.values()) == 1000 and outcomes["refused"] > 0
