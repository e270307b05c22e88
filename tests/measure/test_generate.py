"""Generation through the KV-cache feed loop, checked against onnxruntime-genai token for token."""

import json

import numpy as np
import pytest

import qtc
from qtc.measure.generate import Decoder, Sampling, generate_text
from tests.cli.test_main import assert_bad_input
from tests.cli.test_main import qtc as run_cli

PROMPT = [2, 120, 331, 872, 1045, 77, 2000]  # <bos> and six zh-news tokens


def _genai_tokens(folder, prompt, max_length):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]


@pytest.fixture(scope="module")
def compiled_decoders(kv_decoder, chinese_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoders")
    paths = {"float": kv_decoder}
    for recipe in ("w8a8", "w4a16"):
        result = qtc.compile(kv_decoder, recipe=recipe, calib=chinese_corpus, samples=8, seq_len=64, quiet=True)
        paths[recipe] = result.save(folder / recipe / "model.onnx")
    return paths


@pytest.mark.parametrize("build", ["float", "w8a8", "w4a16"])
def test_onnxruntime_genai_generates_what_the_feed_loop_does(compiled_decoders, build):
    path = compiled_decoders[build]
    config = json.loads((path.parent / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    ours = Decoder(path).generate(PROMPT, 24).tokens
    assert len(ours) == 24
    assert _genai_tokens(path.parent, PROMPT, len(PROMPT) + 24) == ours


def test_cache_and_cacheless_graphs_generate_the_same_tokens(kv_decoder, tiny_llama_reference):
    cached = Decoder(kv_decoder).generate(PROMPT, 12)
    rerun = Decoder(tiny_llama_reference).generate(PROMPT, 12)
    assert cached.kv_cache and not rerun.kv_cache
    assert cached.tokens == rerun.tokens


def test_w4a16_fixes_float_activations_in_the_graph(compiled_decoders):
    """The numerics are in the nodes (MatMulNBits accuracy_level 0), not only in a session config entry."""
    import onnx

    graph = onnx.load(str(compiled_decoders["w4a16"]), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0}


def test_sampling_is_seeded(kv_decoder):
    decoder = Decoder(kv_decoder)
    draw = lambda seed: decoder.generate(PROMPT, 16, Sampling(True, 1.0, 50, seed)).tokens  # noqa: E731
    assert draw(3) == draw(3) and draw(3) != draw(4)


def test_generate_text_and_cli(kv_decoder):
    result = generate_text(kv_decoder, "中国经济", max_new_tokens=8)
    assert result["kv_cache"] and result["prompt_tokens"] >= 2 and 1 <= len(result["tokens"]) <= 8
    cli = run_cli("generate", kv_decoder, "--prompt", "中国经济", "--max-new-tokens", "8", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["tokens"] == result["tokens"]
    assert_bad_input(run_cli("generate", kv_decoder, "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens")
    assert_bad_input(run_cli("generate", kv_decoder, "--prompt", "x", "--sample", "--temperature", "0"), "--temperature")


def test_decode_step_calibration_feeds(kv_decoder):
    """Each window: a prefill of all but the last 4 tokens, then 4 one-token steps on the model's own cache."""
    from qtc.calibration.data import decode_steps, model_inputs, text_feed
    from qtc.frontends.onnx_file import load_model

    inputs = model_inputs(load_model(kv_decoder))
    decoder = Decoder(kv_decoder)
    window = text_feed(np.arange(10, 30, dtype=np.int64), inputs)
    feeds = [feed for feed, _ in decode_steps(window, inputs, decoder._run)]
    assert [f["input_ids"].shape[1] for f in feeds] == [16, 1, 1, 1, 1]
    assert [f["past_key_values.0.key"].shape[2] for f in feeds] == [0, 16, 17, 18, 19]
    assert [int(f["position_ids"][0, -1]) for f in feeds] == [15, 16, 17, 18, 19]
    assert [int(f["input_ids"][0, -1]) for f in feeds] == [25, 26, 27, 28, 29]


def test_export_kv_cache_cli_writes_a_servable_folder(tmp_path):
    out = tmp_path / "zh" / "decoder.onnx"
    result = run_cli("export", "zh-tiny-lm", "--kv-cache", "-o", out)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["decoder.onnx", "decoder.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "decoder.onnx"
    assert Decoder(out).generate(PROMPT, 4).tokens == Decoder(out).generate(PROMPT, 4).tokens
    assert_bad_input(run_cli("export", "zh-tiny-lm"), "--kv-cache")
    assert_bad_input(run_cli("export", "zh-tiny-lm", "--kv-cache", "-o", out), "already holds a genai_config.json")


def test_parity_on_a_decoder_compares_decode_steps(compiled_decoders):
    """Each held-out window: a prefill, then 4 one-token steps on each model's own cache, all compared."""
    from qtc.measure.parity import parity

    result = parity(compiled_decoders["w4a16"], ["cpu"], against=compiled_decoders["float"], samples=2, seq_len=32)
    assert result["decode_steps"] == 4 and result["passed"], result["failures"]
    logits = result["against"]["outputs"]["logits"]
    assert logits["positions"] == 2 * 32  # 28 prefill positions + 4 decode steps per window
    assert 0.9 < logits["top1_agreement"] <= 1.0 and logits["cosine"] > 0.999


def test_layer_skip_on_a_decoder(kv_decoder, chinese_corpus, tmp_path):
    """Gates on a KV decoder: budget 1.0 generates what the ungated build does, token for token; a lower budget
    still writes every layer's present cache (the K/V projections stay outside the gates: a later request at
    another budget finds an exact cache), so the feed loop and onnxruntime-genai run it unchanged."""
    from qtc.passes.layerskip import LayerSkipSpec

    options = dict(recipe="w8a8", calib=chinese_corpus, samples=8, seq_len=64, quiet=True, fuse_residuals=False)
    gated = qtc.compile(kv_decoder, layer_skip=LayerSkipSpec(budgets=(1.0, 0.7), metric="bi"), **options)
    gated_path = gated.save(tmp_path / "gated" / "model.onnx")
    plain_path = qtc.compile(kv_decoder, **options).save(tmp_path / "plain" / "model.onnx")
    dense = Decoder(gated_path, extra={"budget": np.array(1.0, np.float32)}).generate(PROMPT, 16).tokens
    assert dense == Decoder(plain_path).generate(PROMPT, 16).tokens
    assert _genai_tokens(gated_path.parent, PROMPT, len(PROMPT) + 16) == dense  # og feeds no budget: 1.0
    skipping = Decoder(gated_path, extra={"budget": np.array(0.7, np.float32)})
    run = skipping.generate(PROMPT, 16)
    assert len(run.tokens) == 16 and run.decode_tokens_per_s > 0
    assert gated.report["layer_skip"]["realized"][-1]["skipped_branches"] >= 1


@pytest.fixture(scope="module")
def builder_fp32(tmp_path_factory):
    """zh-tiny-lm exported by the ORT GenAI model builder (fp32, cpu): GroupQueryAttention with packed QKV, a
    symbolic head_size in the cache inputs, no position_ids."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("onnxruntime_genai")
    from qtc.models.decoders import tokenizer_config
    from qtc.models.reference import TOKENIZER_FILE, get_reference, lm_config, load_info, load_weights, make_lm

    hf = tmp_path_factory.mktemp("zh-hf")
    model = make_lm(lm_config(load_info("zh-tiny-lm")))
    load_weights(model, get_reference("zh-tiny-lm").weights)
    model.save_pretrained(hf)
    shutil.copyfile(TOKENIZER_FILE, hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps(tokenizer_config()))
    out = tmp_path_factory.mktemp("zh-builder")
    built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                            "-p", "fp32", "-e", "cpu"], capture_output=True, text=True, cwd=out)
    assert built.returncode == 0, built.stderr[-2000:]
    return out / "model.onnx"


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-mlp8-awq"])
def test_a_genai_builder_export_compiles_and_still_serves(builder_fp32, chinese_corpus, recipe, tmp_path):
    result = qtc.compile(builder_fp32, recipe=recipe, calib=chinese_corpus, samples=8, seq_len=64, quiet=True)
    out = result.save(tmp_path / recipe / "model.onnx")
    assert result.report["heldout_comparison"]["outputs"]["logits"]["cosine"] > 0.999
    ours = Decoder(out).generate(PROMPT, 12).tokens
    assert _genai_tokens(out.parent, PROMPT, len(PROMPT) + 12) == ours


def test_a_sliding_window_decoder_serves_with_a_shared_buffer(tmp_path):
    """Gemma 3's local layers fuse into GroupQueryAttention with local_window_size and a window-sized cache, which
    onnxruntime-genai must preallocate: the compiled folder says so (as the GenAI builder's Gemma 3 folder does),
    and og generates what qtc's feed loop does with prompts shorter and longer than the window, decoding across
    it."""
    import onnx

    from qtc.frontends.decoder import DecoderConfig, build_decoder, genai_config
    from qtc.models.synthetic import RandomWeights

    cfg = DecoderConfig(family="llama", vocab_size=96, hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96,
                        head_size=16, sliding_window=5, sliding_layers=(0, 2))
    source = tmp_path / "source" / "model.onnx"
    source.parent.mkdir()
    onnx.save(build_decoder(cfg, RandomWeights(cfg, seed=3)), source)
    (source.parent / "genai_config.json").write_text(json.dumps(genai_config(cfg, source.name)))
    result = qtc.compile(source, recipe="w4a16", quiet=True)
    out = result.save(tmp_path / "w4a16" / "model.onnx")
    windows = [n.attributes.get_int("local_window_size", -1) for n in result.model.graph
               if n.op_type == "GroupQueryAttention"]
    assert windows == [5, -1, 5]
    config = json.loads((out.parent / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["decoder"]["sliding_window"] == {"window_size": 5, "slide_key_value_cache": False,
                                                            "slide_inputs": False, "layers": [0, 2], "cache_slack": 0}
    assert json.loads((source.parent / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    for prompt in ([5, 17, 42, 8, 61, 3, 29], [5, 17, 42]):
        ours = Decoder(out).generate(prompt, 10).tokens
        assert len(ours) == 10
        assert _genai_tokens(out.parent, prompt, len(prompt) + 10) == ours
