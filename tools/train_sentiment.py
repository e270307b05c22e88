"""Train `zh-sentiment`, the reference review classifier; write `weights/zh-sentiment.safetensors` + `.json`.

Architecture (`reference.make_classifier`): transformers `BertModel` without pooler (2 layers, hidden 128,
4 heads of 32, GELU MLP 512, post-LayerNorm, learned absolute positions up to 512, one token type, dropout
0.1), then the masked mean and the masked max over the attended tokens concatenated (256 features), dropout,
`Linear(256, 2)`; label 1 = positive. 987,266 parameters. Tokenizer: the zh-news BPE (4096 tokens,
`weights/zh-news-bpe4096.tokenizer.json`), the same one as zh-tiny-lm, so both reference models share one
vocabulary (0.75 % of review tokens are <unk>); reviews are fed as they are tokenized (no `<bos>`/`[CLS]`, which
is also how `qtc eval --task zh-reviews-acc` feeds a classifier), truncated to 512 tokens. Initialised from
`torch.manual_seed(0)` (HF BERT init, std 0.02).

Data: zh-reviews "train" (13,832 reviews, 80 % of the deduplicated reviews, by hash) for training, "calib"
(1,734) for model selection (the epoch whose weights score best on calib is kept), "eval" (1,797) for the
reported accuracy only. Batches: each epoch a permutation from a seeded `torch.Generator`, cut into pools of 50
batches, each pool sorted by length and split into batches (little padding), the batch order shuffled again
with the same generator. Word dropout: 10 % of the tokens of each training batch replaced by `<unk>` (same
generator).

Optimisation: AdamW (betas 0.9/0.999, weight decay 0.01, none on LayerNorm/bias), peak LR 1e-3, 6 % linear
warmup then linear decay to 0, gradient clipping at 1.0, batch 32, fp32, 4 epochs (1,732 steps). The weights
evaluated, selected and saved are an exponential moving average of the trained ones (decay 0.998).
Deterministic: `torch.use_deterministic_algorithms(True)`, one thread (bit-identical reruns need the same torch
build, CPU ISA and thread count).

Metric: accuracy on zh-reviews "eval" of the fp16-rounded weights that are saved (argmax of the logits).
For scale: a naive-Bayes classifier on binary token unigram + bigram features of the same tokenizer scores
0.801 on eval (0.747 with unigrams only); a first version of this model (mean pooling only, no word dropout, no
weight averaging) 0.827. The labels are noisy (e.g. plainly negative hotel reviews filed as positive).

Results of the committed weights (see `weights/zh-sentiment.json`): RESULTS_PLACEHOLDER

Rebuild: `python tools/train_sentiment.py` (rewrites the weights and the JSON; needs the tokenizer copy
that `python tools/train_lm.py` installs, which it installs itself if missing). Then
`python -m qtc.models.reference zh-sentiment` exports the ONNX model.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np

from qtc.models import reference
from qtc.models.reference import TOKENIZER_FILE
from qtc.util.cache import sha256_file

NAME = "zh-sentiment"
ARCH = dict(layers=2, hidden=128, heads=4, intermediate=512, max_positions=512, dropout=0.1, attention_dropout=0.1,
            pooling="mean+max")
DEFAULTS = dict(
    seed=0,
    epochs=4,
    batch=32,
    max_len=512,
    lr=1e-3,
    warmup_frac=0.06,
    weight_decay=0.01,
    betas=(0.9, 0.999),
    eps=1e-8,
    grad_clip=1.0,
    threads=1,
    pool=50,
    word_dropout=0.1,
    ema_decay=0.998,
)


def _batches(lengths: np.ndarray, hp: dict, gen, torch) -> list[np.ndarray]:
    """One epoch of index batches: seeded permutation, pools sorted by length, batch order shuffled."""
    perm = torch.randperm(len(lengths), generator=gen).numpy()
    pool_size = hp["pool"] * hp["batch"]
    batches = []
    for i in range(0, len(perm), pool_size):
        pool = perm[i : i + pool_size]
        pool = pool[np.argsort(lengths[pool], kind="stable")]
        batches.extend(pool[j : j + hp["batch"]] for j in range(0, len(pool), hp["batch"]))
    order = torch.randperm(len(batches), generator=gen).numpy()
    return [batches[k] for k in order]


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _accuracy(model, rows, labels) -> float:
    model.eval()
    preds = reference.classify(reference.torch_logits_fn(model), rows)
    return float((preds == np.asarray(labels)).mean())


def train(hp: dict, *, limit: int | None = None) -> dict:
    import torch

    torch.set_num_threads(hp["threads"])
    torch.use_deterministic_algorithms(True)
    from train_lm import install_tokenizer

    from qtc.calibration.workloads import get_workload
    from qtc.models.tokenizer import UNK_ID

    tokenizer = reference.load_tokenizer(install_tokenizer())
    reviews = get_workload("zh-reviews")
    splits = {s: reviews.records(s)[:limit] for s in ("train", "calib", "eval")}
    rows = {s: reference.review_rows(tokenizer, [t for t, _ in recs], hp["max_len"]) for s, recs in splits.items()}
    labels = {s: np.array([y for _, y in recs], dtype=np.int64) for s, recs in splits.items()}
    lengths = np.array([len(r) for r in rows["train"]])

    config = dict(ARCH, vocab_size=tokenizer.get_vocab_size())
    model = reference.make_classifier(config, seed=hp["seed"])
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(_param_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=tuple(hp["betas"]),
                            eps=hp["eps"])
    steps_per_epoch = sum(-(-min(hp["pool"] * hp["batch"], len(lengths) - i) // hp["batch"])
                          for i in range(0, len(lengths), hp["pool"] * hp["batch"]))
    total = steps_per_epoch * hp["epochs"]
    warmup = max(1, int(hp["warmup_frac"] * total))
    print(f"{NAME}: {n_params:,} params; {len(lengths)} train reviews ({int(lengths.sum()):,} tokens), "
          f"{hp['epochs']} epochs x {steps_per_epoch} steps", flush=True)

    gen = torch.Generator().manual_seed(hp["seed"])
    torch.manual_seed(hp["seed"])  # dropout
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]  # exponential moving average of the weights: what is evaluated
    best = {"calib_accuracy": -1.0}
    history = []
    step, t0 = 0, time.perf_counter()
    for epoch in range(hp["epochs"]):
        model.train()
        losses = []
        for idx in _batches(lengths, hp, gen, torch):
            lr = hp["lr"] * (step + 1) / warmup if step < warmup else hp["lr"] * max(0.0, (total - step) / (total - warmup))
            for group in opt.param_groups:
                group["lr"] = lr
            ids, mask = reference.pad_rows([rows["train"][i] for i in idx])
            ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
            if hp["word_dropout"]:
                drop = (torch.rand(ids.shape, generator=gen) < hp["word_dropout"]) & (mask == 1)
                ids = ids.masked_fill(drop, UNK_ID)
            logits = model(ids, mask)
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels["train"][idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p, 1 - hp["ema_decay"])
            losses.append(loss.item())
            step += 1
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        calib_acc = _accuracy(model, rows["calib"], labels["calib"])
        el = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": round(float(np.mean(losses)), 4),
                        "calib_accuracy": round(calib_acc, 4), "elapsed_s": round(el, 1)})
        print(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}, calib accuracy {calib_acc:.4f} ({el:.0f}s)",
              flush=True)
        if calib_acc > best["calib_accuracy"]:
            best = {"calib_accuracy": calib_acc, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
        with torch.no_grad():  # back to the live weights
            for p, v in zip(params, live):
                p.copy_(v)
    train_s = time.perf_counter() - t0

    model.load_state_dict(best["state"])
    model.eval()
    reference.round_to_fp16_(model)  # score what is saved
    metric = {s: _accuracy(model, rows[s], labels[s]) for s in ("calib", "eval")}
    print(f"selected epoch {best['epoch']}: calib {metric['calib']:.4f}, eval accuracy {metric['eval']:.4f}",
          flush=True)
    if limit:
        return {"eval_accuracy": metric["eval"]}

    info = {
        "name": NAME,
        "architecture": "BertModel (no pooler) + masked mean pooling + Linear(hidden, 2) "
                        "(qtc.models.reference.make_classifier)",
        "config": config,
        "n_params": n_params,
        "weights": f"{NAME}.safetensors (fp16)",
        "tokenizer": TOKENIZER_FILE.name,
        "tokenizer_sha256": sha256_file(TOKENIZER_FILE),
        "labels": {"0": "negative", "1": "positive"},
        "data": {
            "workload": "zh-reviews",
            "train_split": "train",
            "selection_split": "calib",
            **{f"{s}_split_sha256": reviews.split_info(s)["sha256"] for s in ("train", "calib", "eval")},
            "train_reviews": len(lengths),
            "train_tokens": int(lengths.sum()),
            "max_len": hp["max_len"],
        },
        "training": {
            **hp,
            "betas": list(hp["betas"]),
            "steps": total,
            "warmup_steps": warmup,
            "selected_epoch": best["epoch"],
            "history": history,
            "train_wall_s": round(train_s, 1),
            **reference.training_environment(),
        },
        "metric": {
            "workload": "zh-reviews",
            "split": "eval",
            "split_sha256": reviews.split_info("eval")["sha256"],
            "weights": "fp16-rounded (as saved)",
            "accuracy": round(metric["eval"], 4),
            "calib_accuracy": round(metric["calib"], 4),
            "reviews": len(rows["eval"]),
            "positive_fraction": round(float(labels["eval"].mean()), 4),
            "max_len": hp["max_len"],
        },
    }
    return reference.publish_weights(NAME, model, config, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/train_sentiment.py", description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N reviews of each split (smoke test; writes nothing)")
    args = parser.parse_args(argv)
    hp = dict(DEFAULTS, epochs=args.epochs, lr=args.lr, threads=args.threads)
    train(hp, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
