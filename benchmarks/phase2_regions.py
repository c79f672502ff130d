"""Stage 1b for both things phase 2 does with a compressor, on a pretrained LM and real text.

LLM-TRM's phase 2 compresses the context before the assistant's `<think>` (its model's input) and
decompresses its output for the state at the end of `</think>` into the LM head (the first answer
token). Per D' (32/64/128), scored on the phase-2 regions of HELD-OUT conversations, with each
figure's 95% bootstrap interval over those conversations:

- **1a**: stage 1a's compressor (the closed form on plain English text);
- **1b mse**: stage 1b as it was before `--objective phase2` (`--objective mse`, its 1e-4 default);
- **1b phase2**: `--stage 1b` with every other setting at its default (`--objective phase2`);
- **PCA context** / **PCA close**: each region's own PCA (its training rows' top-D' eigenvectors).

Columns: the context's mse against its own PCA limit (`ctx_pca_eff`), the closing state's next-token
KL and top-1 agreement at the head, the KL when the closing state's code z = W h is perturbed in D'
space by Gaussian noise of mean square 1% of ||z||² (what phase 2's own error does to what it reads
out, `noisy_KL`), and the rows' orthonormality error. The goal of stage 1b at every D': close KL at
or below PCA close's while the context keeps >= 0.98 of its PCA limit.

Model: SmolLM2-135M-Instruct, or Gemma 3 270M with --model gemma3 (benchmarks.real_model), either
given SmolLM3's real chat template (tests/data/smollm3_chat_template.jinja). Conversations: real
English from Python's documentation (`conversations`): the user turn is a paragraph's first
sentence, the assistant's content `<think>\\n{the sentences after it, ~450-700 characters}\\n</think>\\n{the next sentence}`.

    python -m benchmarks.phase2_regions                          # 2,000 conversations, SmolLM2-135M
    python -m benchmarks.phase2_regions --model gemma3 --conversations 800
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine
from trm_ray.references import eigenvectors
from trm_ray.cluster import connect
from trm_ray.compressor import DimensionCompressor, orthonormality_error
from trm_ray.config import make_config
from trm_ray.kl import logit_shift
from trm_ray.shards import split_tables
from trm_ray.model import load_lm_head
from trm_ray.phase2 import CONTEXT_FLOOR, region_codes
from trm_ray.hidden import decode_hidden
from trm_ray.shards import read_manifest
from trm_ray.sweep import run

TEMPLATE = Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm3_chat_template.jinja"
D_VALUES = [32, 64, 128]
TEXT_DOCS = 120
NOISE = 0.01  # mean square of the code's perturbation, relative to ||z||²
NOISE_DRAWS = 8
BOOTSTRAP = 1000


def thinking_model_dir(base: str, out: Path) -> str:
    """The pretrained model's files with SmolLM3's chat template on its tokenizer (the weights are linked)."""
    from transformers import AutoTokenizer

    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.chat_template = TEMPLATE.read_text()
        tokenizer.save_pretrained(out)
        for name in os.listdir(base):
            if not (out / name).exists():
                os.symlink(os.path.join(base, name), out / name)
    return str(out)


def conversations(texts: list[str], path: Path) -> str:
    """One conversation per English document: user = its first sentence, reasoning = the sentences after
    it up to 450-700 characters, answer = the next sentence. Documents too short for all three are skipped."""
    with path.open("w") as f:
        for text in texts:
            sentences = re.split(r"(?<=[.!?])\s+", text)
            if len(sentences) < 4:
                continue
            user, i, reasoning = sentences[0][:300], 1, ""
            while i < len(sentences) - 1 and len(reasoning) < 450:
                reasoning, i = f"{reasoning} {sentences[i]}".strip(), i + 1
            answer = sentences[i][:250]
            f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant",
                                "content": f"<think>\n{reasoning[:700]}\n</think>\n{answer}"}]}) + "\n")
    return str(path)


def sweep(values: dict[str, Any]) -> dict[int, str]:
    """trm_ray's sweep over D_VALUES with `values`; the exported checkpoint of each D'. A sweep whose results
    are already in its output directory is read back, not run again (delete the directory to retrain)."""
    cfg = make_config(dict(sweep=True, sweep_d_values=D_VALUES, num_cpus=8, use_wandb=False, torch_compile=False) | values)
    done = Path(cfg.results_path())
    rows = json.loads(done.read_text()) if done.is_file() else run(cfg, overwrite=True)
    return {r["d_compressed"]: r["checkpoint"] for r in rows}


def held_out(shards_dir: str, val_fraction: float, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per held-out conversation: its context states; and the closing states, one a conversation that has one."""
    codes = region_codes(read_manifest(shards_dir))
    contexts, closes = [], []
    for t in split_tables(shards_dir, val_fraction, seed):
        x, doc, region = decode_hidden(t["hidden"]), t["doc_id"].to_numpy(), t["region"].to_numpy()
        for d in np.unique(doc):
            rows = doc == d
            close = rows & (region == codes["close"])
            if close.sum() == 1:  # a conversation that max_seq_length cut before its closing state is left out
                contexts.append(x[torch.from_numpy(rows & (region == codes["context"]))])
                closes.append(x[torch.from_numpy(close)])
    return contexts, torch.cat(closes)


@torch.no_grad()
def per_conversation(w: torch.Tensor, contexts: list[torch.Tensor], close: torch.Tensor, lm_head: Any) -> dict[str, np.ndarray]:
    """For the compressor of rows `w` [D', D]: each held-out conversation's context squared error and its
    element count, and at its closing state the KL, top-1 agreement and the KL under noise in the code."""
    sse = np.array([float(((c @ w.T @ w - c) ** 2).sum()) for c in contexts])
    count = np.array([c.numel() for c in contexts], dtype=np.float64)
    logp, r, kl = logit_shift(lm_head, close, close @ w.T @ w)
    agree = ((logp + r).argmax(-1) == logp.argmax(-1)).double()
    gen, z, noisy = torch.Generator().manual_seed(0), close @ w.T, torch.zeros(len(close), dtype=torch.float64)
    scale = (NOISE * (z ** 2).sum(-1, keepdim=True) / z.shape[1]).sqrt()
    for _ in range(NOISE_DRAWS):
        noisy += logit_shift(lm_head, close, (z + scale * torch.randn(z.shape, generator=gen)) @ w, logp)[2].double()
    return {"sse": sse, "count": count, "kl": kl.double().numpy(), "top1": agree.numpy(), "noisy_kl": (noisy / NOISE_DRAWS).numpy()}


def interval(values: np.ndarray) -> str:
    """`low-high`: the 95% percentile interval of bootstrap resamples (over conversations)."""
    low, high = np.percentile(values, [2.5, 97.5])
    return f"{low:.3g}-{high:.3g}"


def bootstrap(stats: dict[str, np.ndarray], limit: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Resampled conversations: the context's efficiency (the limit's total error / this one's) and the means at the close."""
    gen = np.random.default_rng(0)
    picks = gen.integers(0, len(stats["sse"]), size=(BOOTSTRAP, len(stats["sse"])))
    return {"ctx_pca_eff": limit["sse"][picks].sum(1) / stats["sse"][picks].sum(1),
            **{k: stats[k][picks].mean(1) for k in ("kl", "top1", "noisy_kl")}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    from benchmarks.real_model import CACHE, english_corpus, non_llama_lm_dir, pretrained_lm_dir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.phase2_regions", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    parser.add_argument("--conversations", type=int, default=2000)
    args = parser.parse_args(argv)
    load, started = os.getloadavg()[0], time.perf_counter()
    work = CACHE / f"p2v2-{args.model}"  # shards are kept: a rerun trains and scores only
    model = thinking_model_dir(pretrained_lm_dir() if args.model == "smollm2" else non_llama_lm_dir(), work / "model")
    corpus = english_corpus(work / "english.jsonl", TEXT_DOCS + args.conversations + 200)
    texts = [json.loads(line)["text"] for line in open(corpus)]
    (work / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:TEXT_DOCS]))
    chats = conversations(texts[TEXT_DOCS:], work / "conversations.jsonl")
    connect(make_config({"num_cpus": 8}))

    trained = {"1a": sweep(dict(model_name=model, dataset=str(work / "text.jsonl"), num_samples=TEXT_DOCS, max_seq_length=256,
                                docs_per_shard=30, output_dir=str(work / "1a")))}
    # The whole validation set's KL at the head (the downstream pass) is not what phase 2 reads: scored below by region.
    stage1b = dict(model_name=model, stage="1b", dataset=chats, num_samples=args.conversations, docs_per_shard=100,
                   shards_dir=str(work / "shards-1b"), downstream=False)
    for name, settings in (("1b mse", dict(objective="mse")), ("1b phase2", {})):
        out = work / name.replace(" ", "-")
        for d, path in trained["1a"].items():  # each 1b run starts from the same 1a checkpoints
            os.makedirs(out / f"d{d}", exist_ok=True)
            shutil.copy(path, out / f"d{d}" / "stage1a_best.pt")
        trained[name] = sweep(stage1b | settings | dict(output_dir=str(out)))

    cfg = make_config(stage1b)
    shards = cfg.shards_path
    lm_head = load_lm_head(model, torch.device("cpu"), torch.float32)
    contexts, close = held_out(shards, cfg.val_fraction, cfg.seed)
    weights = {(name, d): DimensionCompressor.from_checkpoint(path).weight.detach() for name, ckpts in trained.items()
               for d, path in ckpts.items()}
    for region in ("context", "close"):
        vecs = eigenvectors(shards, cfg.val_fraction, cfg.seed, f"spectrum-{region}").float()
        weights.update({(f"PCA {region}", d): vecs[:, :d].T.contiguous() for d in D_VALUES})
    names = [*trained, "PCA context", "PCA close"]
    stats = {key: per_conversation(w, contexts, close, lm_head) for key, w in weights.items()}

    print(f"\nphase2_regions: {read_manifest(shards)['model']}, "
          f"D={close.shape[1]}; {len(close)} held-out conversations ({sum(len(c) for c in contexts):,} context states), "
          f"{read_manifest(shards)['num_docs'] - len(close)} other conversations in training; {time.perf_counter() - started:.0f}s")
    print(machine(load))
    print("figure [95% bootstrap interval over the held-out conversations]")
    print(f"{'D_prime':>7} {'compressor':>12} {'ctx_pca_eff':>24} {'close_KL':>26} {'top1':>6} {'noisy_KL':>26} {'orth_err':>9}")
    figures = {}
    for d in D_VALUES:
        limit = stats["PCA context", d]
        for name in names:
            s, b = stats[name, d], bootstrap(stats[name, d], limit)
            eff = float(limit["sse"].sum() / s["sse"].sum())
            print(f"{d:>7} {name:>12} {eff:>8.4f} [{interval(b['ctx_pca_eff']):>13}] {s['kl'].mean():>9.4g} "
                  f"[{interval(b['kl']):>14}] {s['top1'].mean():>6.3f} {s['noisy_kl'].mean():>9.4g} [{interval(b['noisy_kl']):>14}] "
                  f"{orthonormality_error(weights[name, d]):>9.2g}")
            figures.update({f"{name}/d{d}/ctx_pca_eff": eff, f"{name}/d{d}/close_kl": float(s["kl"].mean()),
                            f"{name}/d{d}/noisy_kl": float(s["noisy_kl"].mean())})
        met = (figures[f"1b phase2/d{d}/close_kl"] <= figures[f"PCA close/d{d}/close_kl"]
               and figures[f"1b phase2/d{d}/ctx_pca_eff"] >= CONTEXT_FLOOR)
        print(f"{'':>7} goal (1b phase2: close KL <= PCA close's, context >= {CONTEXT_FLOOR} of its limit): "
              f"{'met' if met else 'NOT met'}")
    return figures


if __name__ == "__main__":
    main()
