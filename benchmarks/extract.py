"""Extraction speed: tokens/s of trm_ray.extract vs a plain transformers loop, same model, layer, documents and machine.

The plain loop is what a user would write: AutoModel, the documents in their order in
batches of 16, right-padded, `last_hidden_state` (for another layer `hidden_states[layer]`
of `output_hidden_states=True`), the real tokens kept, on all of the
machine's threads (bf16 on a GPU). trm_ray's side is the real thing: `extract()` on its Ray
actors, writing Parquet shards and a manifest. Its steady rate is read from
the shards' completion times (each shard is renamed into place when written): the tokens
of every shard but the first finished, over the time from the first to the last; the
actor's start-up and model load, a fixed cost whatever the corpus, are reported beside it
as the whole extract() wall time. Both sides see the same documents and tokens (first
tokens kept, so both count every real token).

    python -m benchmarks.extract            # SmolLM2-135M (pretrained), real English, ~5 min on 2 cores
    python -m benchmarks.extract --model gemma3 --layer 9   # Gemma 3 270M's middle layer (not Llama-shaped)
    python -m benchmarks.extract --smoke    # the quickstart's toy model, seconds: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from benchmarks.common import machine, print_ratio
from benchmarks.real_model import english_corpus, non_llama_lm_dir, pretrained_lm_dir
from trm_ray.cluster import connect
from trm_ray.config import Config, make_config
from trm_ray.extract import extract
from trm_ray.model import flops_per_token, load_model_config
from trm_ray.shards import read_manifest, shard_paths

FULL = dict(num_samples=128, max_seq_length=256, docs_per_shard=16)
SMOKE = dict(num_samples=24, max_seq_length=32, docs_per_shard=8)
PLAIN_BATCH = 16


MODELS = {"smollm2": pretrained_lm_dir, "gemma3": non_llama_lm_dir}  # `--model`: each gives its directory

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by the name torch reports.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def device_peak() -> tuple[str, float | None]:
    """The device the plain loop runs on and its peak bf16 FLOP/s (None: no GPU, or one not in the table)."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)


def plain_loop(model_name: str, texts: list[str], max_seq_length: int, layer: int) -> tuple[int, float]:
    """(real tokens, seconds) of the loop a user would write; the model is loaded before the clock starts."""
    from transformers import AutoModel, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModel.from_pretrained(model_name, dtype=dtype).to(device).eval()
    tokens, kept = 0, []
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(texts), PLAIN_BATCH):
            enc = tokenizer(texts[start:start + PLAIN_BATCH], truncation=True, max_length=max_seq_length,
                            padding=True, return_tensors="pt").to(device)
            out = model(**enc, output_hidden_states=layer != -1)
            hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            kept.append(hidden[enc["attention_mask"].bool()].cpu())
            tokens += int(enc["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0


def trm_ray_run(cfg: Config) -> tuple[int, float, float]:
    """(tokens after the first shard, seconds from the first shard to the last, whole extract() seconds)."""
    t0 = time.perf_counter()
    manifest = extract(cfg)
    wall = time.perf_counter() - t0
    paths = shard_paths(cfg.shards_path, manifest)
    per_shard = [sum(manifest["doc_tokens"][i * cfg.docs_per_shard:(i + 1) * cfg.docs_per_shard]) for i in range(len(paths))]
    finished = sorted((os.path.getmtime(p), n) for p, n in zip(paths, per_shard))
    return sum(n for _, n in finished[1:]), finished[-1][0] - finished[0][0], wall


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.extract", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the toy model, tiny sizes: checks the script, not the speed")
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="the pretrained model (benchmarks.real_model)")
    parser.add_argument("--layer", type=int, default=-1, help="the hidden-state index extracted")
    args = parser.parse_args(argv)
    smoke = args.smoke
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work_dir:
        if smoke:
            from trm_ray.quickstart import write_assets

            assets = write_assets(os.path.join(work_dir, "assets"), num_docs=SMOKE["num_samples"])
            model_name, corpus, sizes = assets["model"], assets["corpus"], SMOKE
        else:
            model_name, sizes = MODELS[args.model](), FULL
            corpus = english_corpus(os.path.join(work_dir, "english.jsonl"), FULL["num_samples"])
        cfg = make_config(sizes | dict(model_name=model_name, dataset=corpus, output_dir=work_dir, num_cpus=8, layer=args.layer,
                                       exclude_first_token=False, use_gpu=torch.cuda.is_available()))
        connect(cfg)
        texts = [json.loads(line)["text"] for line in open(corpus)][:cfg.num_samples]
        plain_tokens, plain_s = plain_loop(model_name, texts, cfg.max_seq_length, cfg.layer)
        steady_tokens, steady_s, wall = trm_ray_run(cfg)
        manifest = read_manifest(cfg.shards_path)
        total = manifest["num_tokens"]
        flops = flops_per_token(load_model_config(model_name), cfg.layer)
    device, peak = device_peak()
    ours, plain = steady_tokens / steady_s, plain_tokens / plain_s
    print(f"extract: {model_name}, layer {cfg.layer} ({manifest['layer_cut']}), {cfg.num_samples} documents, {total:,} tokens "
          f"(plain loop: {plain_tokens:,}), max_seq_length {cfg.max_seq_length}, on {device}")
    print(machine(load))
    print(f"FLOPs/token (2 x multiplying parameters up to the layer): {flops / 1e9:.4g} GFLOP")
    print(f"trm_ray extract: {ours:,.0f} tokens/s steady ({steady_tokens:,} tokens after the first shard); "
          f"whole extract() {wall:.1f}s = {total / wall:,.0f} tokens/s with Ray and model start-up")
    print(f"plain loop:      {plain:,.0f} tokens/s ({plain_tokens:,} tokens in {plain_s:.1f}s)")
    for name, rate in (("trm_ray", ours), ("plain", plain)):
        achieved = rate * flops
        mfu = f", MFU {achieved / peak:.1%} of {peak / 1e12:,.0f} TFLOP/s" if peak else ""
        print(f"{name}: {achieved / 1e12:,.3f} TFLOP/s achieved{mfu}")
    name = "trm_ray_extract/plain_loop"
    return {name: print_ratio(name, ours, plain, "tokens/s")}


if __name__ == "__main__":
    main()
