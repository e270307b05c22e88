"""Train `zh-tiny-lm`, the reference causal LM, on zh-news; write `weights/zh-tiny-lm.safetensors` + `.json`.

Architecture: `LlamaForCausalLM` from `tiny_llama.make_tiny_llama` (4 layers, hidden 256, 4 query heads and
2 KV heads of 64 (grouped-query attention), SwiGLU MLP 688, RMSNorm, RoPE theta 10000, untied LM head,
vocab 4096 = the zh-news BPE of `qtc.models.tokenizer`), 4,999,424 parameters. Initialised from
`torch.manual_seed(0)` (HF init, std 0.02).

Data: zh-news "calib" (the first 90 % of the People's Daily paragraphs; "eval", the last 10 %, is held out).
Every paragraph becomes `<bos> tokens <eos>`; the paragraphs are concatenated in file order into one token stream
(1.38M tokens), cut into non-overlapping windows of 257 tokens (256 inputs, the same shifted as targets; no
attention mask across paragraph boundaries). Windows are visited in a fixed order: a permutation from
`torch.Generator().manual_seed(seed)` per epoch.

Optimisation: AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices and embeddings, none on norms),
peak LR 2e-3, linear warmup then cosine decay to 10 % of peak, gradient clipping at 1.0, fp32, batch 8 x 256
tokens, STEPS steps (see `DEFAULTS`). Trained with SDPA attention (same maths as the eager attention the
export uses). Deterministic: `torch.use_deterministic_algorithms(True)`, fixed thread count (2); bit-identical
reruns need the same torch build, CPU ISA and thread count.

Metric: held-out bits per character on all of zh-news "eval" (1,949 paragraphs), computed on the fp16-rounded
weights that are saved: each paragraph is `<bos>` + tokens, cut into windows of at most 256 tokens overlapping by
one token, so every token of the paragraph is predicted once (the final `<eos>` is not scored); bits/char =
summed next-token NLL in bits / number of characters of the paragraphs. A uniform model would score
log2(4096) / 1.232 chars per token = 9.74 bits/char.

Results of the committed weights (see `weights/zh-tiny-lm.json` for the exact record): RESULTS_PLACEHOLDER

Rebuild: `python tools/train_lm.py` (rewrites the weights and the JSON; `--measure` only times a few
steps). Then `python -m qtc.models.reference zh-tiny-lm` exports the ONNX model.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from qtc.models import reference
from qtc.models.reference import TOKENIZER_FILE, WEIGHTS_DIR
from qtc.util.cache import sha256_file

NAME = "zh-tiny-lm"
ARCH = dict(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688, max_positions=512)
DEFAULTS = dict(
    seed=0,
    steps=250,
    batch=8,
    seq_len=256,
    lr=3e-3,
    min_lr_ratio=0.1,
    warmup=20,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    eps=1e-8,
    grad_clip=1.0,
    threads=1,
)


def _setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return torch


def install_tokenizer() -> Path:
    """Copy the zh-news BPE (trained on zh-news calib) to weights/ unless an identical copy is there."""
    from qtc.models.tokenizer import zh_news_tokenizer

    src = zh_news_tokenizer(4096)
    if not TOKENIZER_FILE.is_file() or sha256_file(TOKENIZER_FILE) != sha256_file(src):
        if TOKENIZER_FILE.is_file():
            print(f"note: replacing {TOKENIZER_FILE.name} (the tokenizer trainer changed): retrain both models",
                  file=sys.stderr)
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, TOKENIZER_FILE)
    return TOKENIZER_FILE


def token_windows(tokenizer, texts: list[str], seq_len: int) -> tuple[np.ndarray, int]:
    """[n, seq_len + 1] int64: the `<bos> p <eos>` stream of all paragraphs cut into non-overlapping windows;
    and the stream's length in tokens."""
    from qtc.models.tokenizer import BOS_ID, EOS_ID

    stream: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.append(BOS_ID)
        stream.extend(enc.ids)
        stream.append(EOS_ID)
    n = len(stream) // (seq_len + 1)
    return np.asarray(stream[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1), len(stream)


def lr_at(step: int, hp: dict) -> float:
    """Linear warmup over `warmup` steps, then cosine from `lr` to `lr * min_lr_ratio` at the last step."""
    if step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    progress = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"] - 1)
    return hp["lr"] * (hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batches(n_windows: int, batch: int, seed: int, torch):
    """Endless fixed-order stream of window-index batches: a seeded permutation per epoch."""
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        perm = torch.randperm(n_windows, generator=gen)
        for i in range(0, n_windows - batch + 1, batch):
            yield epoch, perm[i : i + batch]
        epoch += 1


def train(hp: dict, *, measure: int = 0, log_every: int = 25) -> dict:
    torch = _setup_torch(hp["threads"])
    from qtc.calibration.workloads import get_workload

    tokenizer = reference.load_tokenizer(install_tokenizer())
    vocab_size = tokenizer.get_vocab_size()
    news = get_workload("zh-news")
    windows, stream_tokens = token_windows(tokenizer, news.texts("calib"), hp["seq_len"])
    data = torch.from_numpy(windows)
    config = dict(ARCH, vocab_size=vocab_size)
    model = reference.make_lm(config, seed=hp["seed"])
    model.config._attn_implementation = "sdpa"  # training only: same maths as eager, faster
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(_param_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=tuple(hp["betas"]),
                            eps=hp["eps"])
    steps = measure or hp["steps"]
    print(f"{NAME}: {n_params:,} params, {len(windows)} windows of {hp['seq_len']} ({stream_tokens:,} tokens), "
          f"{steps} steps of {hp['batch']}", flush=True)
    losses, t0 = [], time.perf_counter()
    batches = _batches(len(windows), hp["batch"], hp["seed"], torch)
    epoch = 0
    for step in range(steps):
        epoch, idx = next(batches)
        x = data[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, hp)
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            print(f"step {step + 1}/{steps} epoch {epoch} loss {np.mean(losses[-log_every:]):.4f} "
                  f"lr {lr_at(step, hp):.2e} {el:.0f}s ({(step + 1) / el:.3f} steps/s)", flush=True)
    train_s = time.perf_counter() - t0
    if measure:
        return {"steps_per_s": steps / train_s}

    model.config._attn_implementation = "eager"
    model.eval()
    reference.round_to_fp16_(model)  # score what is saved
    t1 = time.perf_counter()
    metric = reference.lm_bits_per_char(reference.torch_logits_fn(model), tokenizer, news.texts("eval"),
                                        max_len=hp["seq_len"])
    eval_s = time.perf_counter() - t1
    print(f"eval: {metric['bits_per_char']:.4f} bits/char, token perplexity {metric['perplexity']:.2f} "
          f"({eval_s:.0f}s)", flush=True)

    info = {
        "name": NAME,
        "architecture": "LlamaForCausalLM (qtc.models.tiny_llama.make_tiny_llama)",
        "config": config,
        "n_params": n_params,
        "weights": f"{NAME}.safetensors (fp16)",
        "tokenizer": TOKENIZER_FILE.name,
        "tokenizer_sha256": sha256_file(TOKENIZER_FILE),
        "data": {
            "workload": "zh-news",
            "train_split": "calib",
            "train_split_sha256": news.split_info("calib")["sha256"],
            "format": "<bos> paragraph <eos>, concatenated in file order, non-overlapping windows of seq_len+1",
            "stream_tokens": stream_tokens,
            "windows": len(windows),
        },
        "training": {
            **hp,
            "betas": list(hp["betas"]),
            "tokens_seen": steps * hp["batch"] * hp["seq_len"],
            "epochs": round(steps * hp["batch"] / len(windows), 3),
            "final_train_loss_nats": round(float(np.mean(losses[-50:])), 4),
            "train_wall_s": round(train_s, 1),
            "steps_per_s": round(steps / train_s, 3),
            "eval_wall_s": round(eval_s, 1),
            **reference.training_environment(),
        },
        "metric": {
            "workload": "zh-news",
            "split": "eval",
            "split_sha256": news.split_info("eval")["sha256"],
            "weights": "fp16-rounded (as saved)",
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metric.items()},
            "uniform_bits_per_char": round(math.log2(vocab_size) * metric["tokens"] / metric["chars"], 4),
        },
    }
    return reference.publish_weights(NAME, model, config, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/train_lm.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    parser.add_argument("--measure", type=int, default=0, metavar="N",
                        help="only time N training steps (writes nothing)")
    args = parser.parse_args(argv)
    hp = dict(DEFAULTS, steps=args.steps, batch=args.batch, lr=args.lr, threads=args.threads)
    result = train(hp, measure=args.measure, log_every=5 if args.measure else 25)
    if args.measure:
        print(f"{result['steps_per_s']:.3f} steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
