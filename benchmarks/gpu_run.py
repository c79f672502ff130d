"""The whole flow on a GPU with one command: a SmolLM3-3B-shaped model, extraction, spectrum, a 2-D' sweep, downstream KL.

The model is built from a SmolLM3Config of the real shape (D=2048, 36 layers, 16 heads / 4
KV heads, FFN 11,008, vocab 128,256, tied embeddings) with random weights and saved as an
ordinary model directory: nothing is downloaded (GPU machines may have no hub access), and
throughput does not depend on the weights. The documents are the quickstart's sentences
joined until each fills max_seq_length with its word-level tokenizer. Every stage runs
through trm_ray's own entry points with --use_gpu (so extraction and the downstream task
request GPUs as on a cluster), and the script prints extraction tokens/s, FLOPs/token and
MFU against the GPU's peak, the training tokens/s and validation seconds of each trial (one learning rate:
every D' on each batch), and the time of the PCA-KL pass split over the GPUs.

    python -m benchmarks.gpu_run                 # on a GPU machine; ~5 min on one H100
    python -m benchmarks.gpu_run --objective kl  # the same sweep trained on the LM head's next-token KL
    python -m benchmarks.gpu_run --tiny          # the same flow at toy size on CPU (what the tests run)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import SmolLM3Config, SmolLM3ForCausalLM

from benchmarks.common import machine
from benchmarks.extract import device_peak, trm_ray_run
from trm_ray import spectrum, sweep
from trm_ray.cluster import connect
from trm_ray.config import make_config
from trm_ray.downstream import pca_kl
from trm_ray.model import flops_per_token, load_model_config
from trm_ray.quickstart import make_documents, make_tokenizer

SMOLLM3_3B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=65536, rope_theta=5e6,
                  tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
# Run sizes: 2,048 x 512 = 1M tokens (4 GiB of bf16 shards) keeps each stage to a minute or two on one GPU.
FULL_RUN = dict(num_samples=2048, max_seq_length=512, docs_per_shard=256, sweep_d_values=[256, 1024], batch_size=64,
                num_epochs=3)
TINY_RUN = dict(num_samples=48, max_seq_length=64, docs_per_shard=16, sweep_d_values=[8, 16], batch_size=4,
                num_epochs=2, torch_compile=False)


def write_model(out: Path, shape: dict[str, Any]) -> str:
    """A random-weights SmolLM3 of `shape` with the quickstart's tokenizer, as a save_pretrained directory."""
    tokenizer = make_tokenizer()
    config = SmolLM3Config(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising 3B parameters is a minute on CPU, a second on a GPU
        model = SmolLM3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def write_corpus(path: Path, num_docs: int, max_seq_length: int) -> str:
    """Documents of at least max_seq_length words (each word is a token or more), so every one fills its row."""
    sentences = iter(make_documents(num_docs * max_seq_length // 8))
    with path.open("w") as f:
        for _ in range(num_docs):
            words: list[str] = []
            while len(words) < max_seq_length:
                words += next(sentences).split()
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return str(path)


def trial_medians(output_dir: str, key: str) -> dict[str, float]:
    """Median of `key` (tokens/s, validation seconds) of each trial (a learning rate, every D') over its epochs after
    the first (Tune's result.json)."""
    medians = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "ray_results", "*", "*", "result.json"))):
        reports = [json.loads(line) for line in open(path) if line.strip()]
        per_epoch = [r[key] for r in reports if key in r]
        if per_epoch:
            medians[Path(path).parent.name] = statistics.median(per_epoch[1:] or per_epoch)
    return medians


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy model and sizes, CPU: checks the flow, not the speed")
    parser.add_argument("--num_samples", type=int, help="documents to extract (default 2,048; 48 with --tiny)")
    parser.add_argument("--work_dir", help="where the model, shards and results go (default: a temporary directory)")
    parser.add_argument("--objective", default="mse", choices=["mse", "kl", "mse+kl"],
                        help="the sweep's training loss (kl: the 128,256-wide head in every step, bf16 on the GPU)")
    args = parser.parse_args(argv)
    shape, sizes = (TINY, TINY_RUN) if args.tiny else (SMOLLM3_3B, FULL_RUN)
    if args.num_samples:
        sizes = sizes | {"num_samples": args.num_samples}
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_run needs a GPU (CUDA); pass --tiny to run the same flow at toy size on CPU")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model = write_model(work / "smollm3-shaped", shape)
        corpus = write_corpus(work / "corpus.jsonl", sizes["num_samples"], sizes["max_seq_length"])
        print(f"gpu_run: model and corpus written in {time.perf_counter() - t0:.1f}s", flush=True)
        cfg = make_config(sizes | dict(model_name=model, dataset=corpus, output_dir=str(work / "out"), sweep=True,
                                       use_gpu=not args.tiny, use_wandb=False, num_cpus=8, grace_period=sizes["num_epochs"],
                                       objective=args.objective))
        connect(cfg)
        steady_tokens, steady_s, extract_wall = trm_ray_run(cfg)
        t0 = time.perf_counter()
        spectrum.load_or_compute(cfg.shards_path, cfg.val_fraction, cfg.seed)
        spectrum_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = sweep.run(cfg)
        sweep_s = time.perf_counter() - t0
        train_rates = trial_medians(cfg.output_dir, "tokens_per_s")
        validation_s = trial_medians(cfg.output_dir, "validation_s")
        # The PCA reconstruction's KL over the validation set, split over every GPU (the pass a KL sweep starts with).
        t0 = time.perf_counter()
        pca_kl(cfg.use_gpu, cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed, cfg.d_values)
        pca_kl_s = time.perf_counter() - t0
        flops = flops_per_token(load_model_config(model), cfg.layer)
    device, peak = device_peak()
    extract_rate = steady_tokens / steady_s
    print(f"gpu_run: SmolLM3-{'tiny' if args.tiny else '3B'}-shaped random weights (D={shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']:,}), {cfg.num_samples} x {cfg.max_seq_length} "
          f"tokens, on {device}")
    print(machine(load))
    mfu = f", MFU {extract_rate * flops / peak:.1%} of {peak / 1e12:,.0f} TFLOP/s" if peak else ""
    print(f"extraction: {extract_rate:,.0f} tokens/s steady, {flops / 1e9:.4g} GFLOP/token, "
          f"{extract_rate * flops / 1e12:,.1f} TFLOP/s{mfu} (whole extract() {extract_wall:.1f}s)")
    print(f"spectrum: {spectrum_s:.1f}s; sweep of D' {cfg.d_values}: {sweep_s:.1f}s")
    for name, rate in train_rates.items():
        print(f"training {name}: {rate:,.0f} tokens/s, validation {validation_s.get(name, float('nan')):.2f}s an epoch "
              f"(medians of epochs 2+; {cfg.num_workers} worker(s), each scoring its share)")
    gpus = torch.cuda.device_count() if cfg.use_gpu else 0
    print(f"PCA-KL pass over the validation set, D' {cfg.d_values}: {pca_kl_s:.1f}s, split over "
          f"{f'{gpus} GPU(s)' if cfg.use_gpu else 'the CPU cores'}")
    for r in rows:
        print(f"D'={r['d_compressed']}: mse {r.get('mse', float('nan')):.4g}, pca_efficiency "
              f"{r.get('pca_efficiency', float('nan')):.3f}, downstream KL {r.get('downstream_kl', float('nan')):.4g} "
              f"(PCA {r.get('pca_downstream_kl', float('nan')):.4g})")
    return {"extract_tokens_per_s": extract_rate, "pca_kl_pass_s": pca_kl_s,
            **{f"train_tokens_per_s/{k}": v for k, v in train_rates.items()},
            **{f"validation_s/{k}": v for k, v in validation_s.items()},
            **{f"downstream_kl/d{r['d_compressed']}": r.get("downstream_kl", float("nan")) for r in rows}}


if __name__ == "__main__":
    main()
