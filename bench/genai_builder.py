"""Run the ORT GenAI model builder on a transformers-5 checkpoint it cannot read unaided.

    python bench/genai_builder.py -i HF_DIR -o OUT -p int4 -e cpu      (the builder's own arguments)

onnxruntime-genai 0.18.0's base builder reads `config.rope_parameters["rope_type"]` and, for Gemma 3,
`config.rope_local_base_freq`; transformers 5 stores Gemma 3's RoPE per layer type
(`rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`) and drops `rope_local_base_freq`, so
the builder stops with KeyError 'rope_type'. This wrapper hands it the transformers-4 form of the same values
(global theta from full_attention, local theta from sliding_attention) and changes nothing else; it exists only
so the decoder tables can compare qtc with the builder on the same source.
"""

from __future__ import annotations

import runpy

import transformers

_from_pretrained = transformers.AutoConfig.from_pretrained.__func__


def _flat_rope(cls, *args, **kwargs):
    config = _from_pretrained(cls, *args, **kwargs)
    per_layer = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in per_layer and "sliding_attention" in per_layer:
        config.rope_local_base_freq = per_layer["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(per_layer["full_attention"])
        config.rope_theta = per_layer["full_attention"]["rope_theta"]
    return config


transformers.AutoConfig.from_pretrained = classmethod(_flat_rope)
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
