"""KV-cache inputs found by structure (Concat into a present, GroupQueryAttention), names only as a fallback."""

import onnx_ir as ir
from onnx import TensorProto, helper

from qtc.core.decoder import cache_pairs, is_kv_decoder
from qtc.frontends.onnx_file import load_model


def _graph(nodes, inputs, outputs) -> ir.Graph:
    info = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [info(n, t, s) for n, t, s in inputs], [info(n, t, s) for n, t, s in outputs])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                                 helper.make_opsetid("com.microsoft", 1)])).graph


CACHE = [1, 2, "past", 8]


def test_concat_form_whatever_the_names(kv_decoder):
    pairs = cache_pairs(load_model(kv_decoder).graph)
    assert len(pairs) == 8 and pairs["past_key_values.0.key"] == "present.0.key"
    renamed = _graph([helper.make_node("Concat", ["cache_in_7", "new"], ["cache_out_7"], axis=2)],
                     [("cache_in_7", TensorProto.FLOAT, CACHE), ("new", TensorProto.FLOAT, [1, 2, 1, 8])],
                     [("cache_out_7", TensorProto.FLOAT, [1, 2, "total", 8])])
    assert cache_pairs(renamed) == {"cache_in_7": "cache_out_7"}


def test_group_query_attention_form():
    inputs = [("q", TensorProto.FLOAT, [1, 1, 32]), ("pk", TensorProto.FLOAT, CACHE), ("pv", TensorProto.FLOAT, CACHE),
              ("seqlens", TensorProto.INT32, [1]), ("total", TensorProto.INT32, [])]
    node = helper.make_node("GroupQueryAttention", ["q", "", "", "pk", "pv", "seqlens", "total"], ["o", "kk", "vv"],
                            domain="com.microsoft", num_heads=4, kv_num_heads=2)
    outputs = [("o", TensorProto.FLOAT, [1, 1, 32]), ("kk", TensorProto.FLOAT, CACHE), ("vv", TensorProto.FLOAT, CACHE)]
    assert cache_pairs(_graph([node], inputs, outputs)) == {"pk": "kk", "pv": "vv"}


def test_names_when_the_structure_is_hidden_and_nothing_for_other_inputs():
    """A cache passed through an op qtc does not know is paired by the conventional names; a plain rank-4
    activation input with no present is not a cache."""
    nodes = [helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Relu", ["image"], ["y"])]
    inputs = [("past_key_values.0.key", TensorProto.FLOAT, CACHE), ("image", TensorProto.FLOAT, [1, 3, 8, 8])]
    outputs = [("present.0.key", TensorProto.FLOAT, CACHE), ("y", TensorProto.FLOAT, [1, 3, 8, 8])]
    graph = _graph(nodes, inputs, outputs)
    assert cache_pairs(graph) == {"past_key_values.0.key": "present.0.key"}
    assert not is_kv_decoder(_graph([nodes[1]], inputs[1:], outputs[1:]))
