"""Recipes: built-ins and YAML parse into the same validated objects; overrides follow the documented precedence."""

import pytest
import yaml

from qtc.errors import QtcError
from qtc.recipes import (
    QuantSpec,
    builtin_names,
    builtin_recipe,
    load_recipe,
    parse_recipe,
)


def test_builtins_resolve():
    assert {"w8a8", "w8a16"} <= set(builtin_names())
    w8a8 = builtin_recipe("w8a8")
    assert w8a8.weight == QuantSpec("int8", "channel", True)
    assert w8a8.activation.calibrator == "minmax" and w8a8.activation.granularity == "tensor"
    assert w8a8.needs_calibration
    w8a16 = builtin_recipe("w8a16")
    assert w8a16.activation is None and not w8a16.needs_calibration


def test_yaml_round_trip_gives_equal_recipe(tmp_path):
    for name in builtin_names():
        recipe = builtin_recipe(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe.to_dict()))
        assert load_recipe(path) == recipe


@pytest.mark.parametrize(
    "data, message",
    [
        ({"base": "w8a8", "colour": "red"}, "unknown key 'colour'"),
        ({"base": "w8a8", "weight": {"bits": 4}}, "unknown key 'bits'"),
        ({"base": "w8a8", "overrides": [{"name": "*x*", "quantise": False}]}, "unknown key 'quantise'"),
        ({"base": "w8a8", "overrides": [{"name": "*x*", "node": "n"}]}, "exactly one of"),
        ({"base": "w8a8", "weight": {"dtype": "int3"}}, "unknown dtype 'int3'"),
        ({"base": "w8a8", "activation": {"calibrator": "magic"}}, "unknown calibrator 'magic'"),
        ({"base": "w8a8", "op_types": ["Softmax"]}, "unknown op_types entry"),
        ({"base": "nope"}, "unknown recipe 'nope'"),
        ({"name": "x"}, "needs 'weight'"),
    ],
)
def test_invalid_recipes_are_errors(data, message):
    with pytest.raises(QtcError, match=message):
        parse_recipe(data)


def test_precedence_global_op_type_glob_node():
    recipe = parse_recipe(
        {
            "base": "w8a8",
            "overrides": [
                {"node": "mm_special", "activation": {"calibrator": "entropy"}},  # listed first, still wins last
                {"name": "*down_proj*", "recipe": "w8a16"},
                {"op_type": "MatMul", "activation": {"calibrator": "percentile", "percentile": 99.9}},
                {"op_type": "Conv", "quantize": False},
            ],
        }
    )
    plain = recipe.resolve("mm", "MatMul")
    assert plain.activation.calibrator == "percentile"  # op_type beats global
    down = recipe.resolve("mm_down", "MatMul", ("model.layers.0.mlp.down_proj",))
    assert down.activation is None  # the glob (w8a16 preset) beats op_type
    special = recipe.resolve("mm_special", "MatMul", ("model.layers.0.mlp.down_proj",))
    assert special.activation.calibrator == "entropy"  # node name beats glob
    assert recipe.resolve("conv", "Conv") is None
    assert recipe.resolve("gemm", "Gemm").activation.calibrator == "minmax"  # untouched global


def test_keep_float_roles_and_reenabling():
    recipe = builtin_recipe("w8a8")
    assert recipe.resolve("head", "MatMul", role="lm_head") is None
    enabled = parse_recipe({"base": "w8a8", "overrides": [{"name": "head", "quantize": True}]})
    assert enabled.resolve("head", "MatMul", role="lm_head") is not None


def test_with_calibrator_overrides_activation_only():
    recipe = builtin_recipe("w8a8").with_calibrator("mse")
    assert recipe.activation.calibrator == "mse"
    assert builtin_recipe("w8a16").with_calibrator("mse").activation is None
