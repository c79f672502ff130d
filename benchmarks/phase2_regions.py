"""Stage 1b on the states phase 2 reads: which training data makes the best compressor for them.

LLM-TRM's phase 2 compresses the context before the assistant's `<think>` and the one state at
the end of `</think>`. Three compressors per D' are scored on those regions of HELD-OUT
conversations: stage 1a (plain English text), stage 1b trained on the reasoning spans
(`--keep_tokens thinking`), and stage 1b trained on phase 2's regions (`--keep_tokens phase2`),
both 1b runs starting from the same 1a checkpoints. Each is trained by trm_ray's own sweep
(`trm_ray.sweep.run`) and scored by `trm_ray.regions.measure_regions` against each region's own
PCA limit. The first token of each sequence, which phase 2 compresses too, is scored apart.

Model: SmolLM2-135M-Instruct (benchmarks.real_model), whose ChatML tokenizer is given SmolLM3's
real chat template (tests/data/smollm3_chat_template.jinja: the system block with its date and
`/think` instructions, then the turns). Conversations: real English from Python's documentation
(`conversations`): the user turn is a paragraph's first sentence, the assistant's content
`<think>\\n{the sentences after it, ~450-700 characters}\\n</think>\\n{the next sentence}`.

    python -m benchmarks.phase2_regions      # 160 conversations, D' 32/64/128: ~17 minutes on 2 cores at load 3-9
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

import torch

from benchmarks.common import machine
from trm_ray import spectrum
from trm_ray.cli import connect
from trm_ray.compressor import DimensionCompressor
from trm_ray.config import Config, make_config
from trm_ray.downstream import split_tables
from trm_ray.regions import measure_regions
from trm_ray.shards import decode_hidden
from trm_ray.sweep import run
from trm_ray.text import REGIONS

TEMPLATE = Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm3_chat_template.jinja"
D_VALUES = [32, 64, 128]
TEXT_DOCS, CONVERSATIONS = 120, 160


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
    """trm_ray's sweep over D_VALUES with `values`; the exported checkpoint of each D'."""
    rows = run(make_config(dict(sweep=True, sweep_d_values=D_VALUES, num_cpus=8, use_wandb=False, torch_compile=False,
                                batch_size=4) | values), overwrite=True)
    return {r["d_compressed"]: r["checkpoint"] for r in rows}


def first_token_rows(shards_dir: str, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation rows of phase 2's shards: the first tokens' states, and the other context states."""
    first, rest = [], []
    for t in split_tables(shards_dir, cfg.val_fraction, cfg.seed):
        x, pos, region = decode_hidden(t["hidden"]), t["position"].to_numpy(), t["region"].to_numpy()
        first.append(x[torch.from_numpy(pos == 0)])
        rest.append(x[torch.from_numpy((pos > 0) & (region == REGIONS.index("context")))])
    return torch.cat(first), torch.cat(rest)


def pca_with_and_without_first(shards_dir: str, cfg: Config, x0: torch.Tensor, rest: torch.Tensor) -> list[str]:
    """The MSE optimum (PCA of the training rows) with and without the first tokens among them,
    scored on the held-out first tokens and other context tokens: what keeping it costs and gains."""
    train = [(decode_hidden(t["hidden"]).double(), t["position"].to_numpy())
             for t in split_tables(shards_dir, cfg.val_fraction, cfg.seed, val_side=False)]
    lines = []
    for name, keep_first in (("with", True), ("without", False)):
        xtx = sum((x[torch.from_numpy((pos > 0) | keep_first)].T @ x[torch.from_numpy((pos > 0) | keep_first)]) for x, pos in train)
        vecs = torch.linalg.eigh(xtx)[1].flip(1).float()
        for d in D_VALUES:
            top = vecs[:, :d]
            f, r = score(lambda h: (h @ top) @ top.T, x0), score(lambda h: (h @ top) @ top.T, rest)
            lines.append(f"{name:>8} {d:>8} {f['mse']:>11.4g} {f['cos']:>9.4f} {r['mse']:>11.4g} {r['cos']:>9.4f}")
    return lines


def score(reconstruct: Any, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        x_hat = reconstruct(x)
    return {"mse": float(((x_hat - x) ** 2).mean()), "cos": float(torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    from benchmarks.real_model import CACHE, english_corpus, pretrained_lm_dir

    argparse.ArgumentParser(prog="python -m benchmarks.phase2_regions", description=__doc__.splitlines()[0]).parse_args(argv)
    load, started = os.getloadavg()[0], time.perf_counter()
    work = CACHE / "phase2_regions"  # shards are kept: a rerun trains and scores only
    model = thinking_model_dir(pretrained_lm_dir(), work / "smollm2-135m-smollm3-template")
    corpus = english_corpus(work / "english.jsonl", TEXT_DOCS + 2 * CONVERSATIONS)
    texts = [json.loads(line)["text"] for line in open(corpus)]
    (work / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:TEXT_DOCS]))
    chats = conversations(texts[TEXT_DOCS:], work / "conversations.jsonl")
    connect(make_config({"num_cpus": 8}))

    base = dict(model_name=model)
    trained = {"1a": sweep(base | dict(dataset=str(work / "text.jsonl"), num_samples=TEXT_DOCS, max_seq_length=256,
                                       docs_per_shard=30, num_epochs=2, output_dir=str(work / "1a")))}
    stage1b = base | dict(stage="1b", dataset=chats, num_samples=CONVERSATIONS, max_seq_length=512, docs_per_shard=40,
                          num_epochs=6, learning_rate=0.01)
    for mode in ("thinking", "phase2"):
        out = work / f"1b-{mode}"
        for d, path in trained["1a"].items():  # each 1b run starts from the same 1a checkpoints
            os.makedirs(out / f"d{d}", exist_ok=True)
            shutil.copy(path, out / f"d{d}" / "stage1a_best.pt")
        trained[f"1b {mode}"] = sweep(stage1b | dict(keep_tokens=mode, output_dir=str(out), exclude_first_token=False,
                                                     shards_dir=str(work / f"shards-1b-{mode}")))  # phase 2 reads the first token
    cfg = make_config(stage1b)
    held_out = str(work / "shards-1b-phase2")
    pca_mse = {r: spectrum.load_or_compute(held_out, cfg.val_fraction, cfg.seed, region=r)["pca_mse"] for r in ("context", "close")}
    scores = {name: measure_regions(model, held_out, cfg.val_fraction, cfg.seed, ckpts, pca_mse, True)
              for name, ckpts in trained.items()}
    x0, rest = first_token_rows(held_out, cfg)

    print(f"\nphase2_regions: {os.path.basename(model)}, D=576; scored on the phase-2 regions of "
          f"{scores['1a'][D_VALUES[0]]['close_tokens']} held-out conversations "
          f"({scores['1a'][D_VALUES[0]]['context_tokens']:,} context states, first tokens included); "
          f"{time.perf_counter() - started:.0f}s")
    print(machine(load))
    print(f"{'D_prime':>8} {'trained on':>12} {'ctx_mse':>10} {'ctx_cos':>8} {'ctx_pca_eff':>11} {'close_cos':>9} "
          f"{'close_KL':>9} {'pca_KL':>9} {'top1':>6} {'pca_top1':>8} {'first_cos':>9}")
    figures, first = {}, {(name, d): score(DimensionCompressor.from_checkpoint(path), x0)
                          for name, ckpts in trained.items() for d, path in ckpts.items()}
    for d in D_VALUES:
        for name, s in scores.items():
            m = s[d]
            print(f"{d:>8} {name:>12} {m['context_mse']:>10.4g} {m['context_cosine_similarity']:>8.4f} "
                  f"{m['context_pca_efficiency']:>11.4f} {m['close_cosine_similarity']:>9.4f} {m['close_downstream_kl']:>9.4g} "
                  f"{m['close_pca_downstream_kl']:>9.4g} {m['close_top1_agreement']:>6.3f} {m['close_pca_top1_agreement']:>8.3f} "
                  f"{first[name, d]['cos']:>9.4f}")
            figures.update({f"{name}/d{d}/{k}": v for k, v in m.items()} | {f"{name}/d{d}/first_cos": first[name, d]["cos"]})
    norms = torch.linalg.vector_norm(rest, dim=-1)
    print(f"\nfirst token: {len(x0)} held-out states, spread {float((x0 - x0[0]).norm(dim=-1).max()):.3g} "
          f"(one state: position 0 sees only itself), norm {float(x0[0].norm()):.4g} vs median context norm "
          f"{float(norms.median()):.4g}; mse / cosine of the exported compressors on it:")
    for d in D_VALUES:
        print(f"{d:>8} " + "  ".join(f"{name}: {first[name, d]['mse']:.4g} / {first[name, d]['cos']:.4f}" for name in trained))
    print("\nPCA of phase 2's training rows, with or without the first tokens among them "
          "(the MSE optimum the 1b trainer approaches):")
    print(f"{'first':>8} {'D_prime':>8} {'first_mse':>11} {'first_cos':>9} {'ctx_mse':>11} {'ctx_cos':>9}   (context: positions > 0)")
    for line in pca_with_and_without_first(held_out, cfg, x0, rest):
        print(line)
    return figures


if __name__ == "__main__":
    main()
