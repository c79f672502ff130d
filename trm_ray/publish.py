"""Hand one exported compressor over to LLM-TRM's phase 2: a hub folder, and its upload.

    python -m trm_ray.publish checkpoints/phase1 --d_compressed 256             # writes the folder
    python -m trm_ray.publish checkpoints/phase1 --d_compressed 256 --stage 1b --repo user/llm-trm-compressor

Phase 2 fetches `compressor.pt` from a hub repo (`hf_hub_download(repo_id, "compressor.pt")`, its
default `anonx3247/llm-trm-compressor`) or reads a local path, so the folder holds that file, a model
card that says what the compressor was trained on and how well it does (the sweep's row of that D'),
and the sweep's plot. The folder is written first and kept whatever the upload does: an upload that
fails (no network, no token) costs nothing but the upload, which the printed command redoes.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
from typing import Any

import yaml

from trm_ray.compressor import load_checkpoint, save_checkpoint
from trm_ray.config import FIELDS, UserError, make_config
from trm_ray.files import read_json
from trm_ray.text import looks_like_path
from trm_ray.spec import config_of

HUB_FILE = "compressor.pt"  # the name phase 2 downloads

# What a model card reports of a row, in this order, where the row has it.
CARD_METRICS = (
    ("mse", "validation mse"),
    ("cosine_similarity", "cosine similarity"),
    ("relative_error", "relative error ‖x̂ - x‖ / ‖x‖"),
    ("variance_ratio", "variance ratio Var(x̂) / Var(x)"),
    ("centred_cosine_similarity", "cosine similarity, centred about the training mean"),
    ("centred_explained_variance", "explained variance, centred about the training mean"),
    ("explained_variance", "explained variance (uncentred)"),
    ("orthonormality_error", "orthonormality error ‖W Wᵀ - I‖_F / sqrt(D')"),
    ("pca_mse", "PCA limit: mse of the best tied linear compressor of this width"),
    ("pca_efficiency", "PCA-limit mse / mse (1.0 = at the limit)"),
    ("pca_cosine_similarity", "PCA limit: cosine similarity"),
    ("pca_centred_explained_variance", "PCA limit: explained variance, centred"),
    ("downstream_kl", "next-token KL at the LM head, nats/token"),
    ("pca_downstream_kl", "PCA's next-token KL at the LM head, nats/token"),
    ("top1_agreement", "top-1 agreement at the LM head with the original state"),
    ("pca_top1_agreement", "PCA's top-1 agreement at the LM head"),
    ("ce_increase", "cross-entropy increase at the LM head, nats/token"),
    # Stage 1b's per-region scores: what phase 2 compresses (context) and decompresses into the head (close).
    ("context_mse", "phase-2 context: mse"),
    ("context_cosine_similarity", "phase-2 context: cosine similarity"),
    ("context_pca_efficiency", "phase-2 context: the region's PCA-limit mse / mse"),
    ("close_downstream_kl", "state at the closing marker: next-token KL at the LM head"),
    ("close_top1_agreement", "state at the closing marker: top-1 agreement at the LM head"),
)


# What a checkpoint's config says of where and how its run ran, not of what was trained: never published.
WHERE_IT_RAN = ("output_dir", "shards_dir", "train_storage", "command", "address", "num_cpus", "num_extract_workers",
                "max_concurrent_trials", "max_failures", "cache_datasets", "skip_disk_check", "use_wandb", "wandb_project",
                "wandb_run_name", "group")
LOCATIONS = ("model_name", "dataset", "compressor_checkpoint")  # a hub id, or a local path published by its base name


def public_name(name: str | None) -> str | None:
    """A hub id as it is; a local path (or URI) by its base name alone, which names it without the machine's directories."""
    if name is None or (not looks_like_path(name) and not os.path.exists(name) and "://" not in name):
        return name
    return os.path.basename(os.path.normpath(name))


def public_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as it may be uploaded to a public hub: what identifies the run (model, data, layer,
    the training settings, D and D'), without the machine's paths, cluster address or command line."""
    return {k: public_name(v) if k in LOCATIONS else v for k, v in settings.items() if k not in WHERE_IT_RAN}


def exported_row(output_dir: str, d_compressed: int, stage: str) -> dict[str, Any]:
    """The sweep's summary row of this D' and stage, which names the exported checkpoint."""
    path = make_config({"output_dir": output_dir, "stage": stage}).results_path()
    rows = read_json(path)
    if rows is None:
        raise UserError(f"{output_dir} has no stage {stage} results ({os.path.basename(path)}): "
                        f"run python -m trm_ray.sweep with --output_dir {output_dir} first, or pass --stage")
    found = [r for r in rows if r["d_compressed"] == d_compressed]
    if not found:
        raise UserError(f"the stage {stage} results in {output_dir} have no D' = {d_compressed}; "
                        f"they have {', '.join(str(r['d_compressed']) for r in rows)}")
    if "checkpoint" not in found[0]:
        raise UserError(f"D' = {d_compressed} of stage {stage} failed in that sweep ({found[0].get('error')}): "
                        "nothing was exported to publish")
    return found[0]


def model_card(row: dict[str, Any], settings: dict[str, Any], repo: str | None) -> str:
    cfg = config_of(settings)
    d, d_prime = settings["hidden_size"], settings["d_compressed"]
    hub = not looks_like_path(cfg.dataset) and not os.path.exists(cfg.dataset)
    source = cfg.dataset + (f" ({cfg.dataset_config}, split {cfg.dataset_split})" if hub and cfg.dataset_config else "")
    kept = {"1a": "every token of each document",
            "1b": f"the {cfg.keep_tokens!r} tokens of each conversation (--keep_tokens {cfg.keep_tokens})"}[cfg.stage]
    if cfg.exclude_first_token:
        kept += ", without the first token of each sequence"
    metrics = "\n".join(f"| {label} | {row[key]:.6g} |" for key, label in CARD_METRICS
                        if isinstance(row.get(key), float) and math.isfinite(row[key]))
    where = repo or "<path to this folder>/compressor.pt"
    made = yaml.safe_dump({k: v for k, v in settings.items() if k in FIELDS}, sort_keys=True).strip()
    return f"""---
tags:
- llm-trm
- compressor
- dimensionality-reduction
- trm_ray
library_name: pytorch
---

# LLM-TRM dimension compressor: D={d} -> D'={d_prime} ({d / d_prime:.1f}x), stage {cfg.stage}

A weight-tied linear compressor of a causal LM's hidden states, x -> W x -> Wᵀ z, with W of
shape D' x D = {d_prime} x {d}, trained by trm_ray for LLM-TRM's phase 2.

## What it compresses

| | |
|---|---|
| model | `{cfg.model_name}` |
| layer | {cfg.layer} (index into `hidden_states`; -1 is the last, after the final norm) |
| data | {source}, {cfg.num_samples:,} documents of at most {cfg.max_seq_length} tokens |
| tokens trained on | {kept} |
| input dimension D | {d} |
| compressed dimension D' | {d_prime} |
| compression ratio | {d / d_prime:.1f}x |
| stage | {cfg.stage} |
| objective | {cfg.objective} |

## Validation metrics

On held-out documents of the same data (never trained on; the best epoch and learning rate were
picked on them too).

| metric | value |
|---|---|
{metrics}

## How it was made

trm_ray's settings for the run, a `--config` file of `python -m trm_ray.sweep` (a local model or data set by its base name):

```yaml
{made}
```

## Use in LLM-TRM phase 2

```bash
python -m src.train.phase2_trm --compressor_checkpoint {where} --data_path ./data/hidden_pairs/hidden_pairs.pt
```

`compressor.pt` is a phase-1 checkpoint in LLM-TRM's own layout: `compressor` holds
`compress.weight` (D' x D), `config` answers `hidden_size`, `d_compressed` and
`compression_ratio`, `best_metrics` the validation metrics above.
"""


def write_folder(output_dir: str, d_compressed: int, stage: str, repo: str | None) -> str:
    """<output_dir>/hub/d<D'>-stage<stage>/: compressor.pt (re-written in today's layout, so a checkpoint
    from before trm_ray took LLM-TRM's layout is converted here), README.md and the sweep's plot."""
    row = exported_row(output_dir, d_compressed, stage)
    ckpt = load_checkpoint(row["checkpoint"], d_compressed=d_compressed)
    plot = config_of(ckpt["config"].to_dict()).results_path("report", "png")
    settings = public_settings(ckpt["config"].to_dict())
    settings.setdefault("hidden_size", row["d_model"])
    settings.setdefault("d_compressed", d_compressed)
    folder = os.path.join(output_dir, "hub", f"d{d_compressed}-stage{stage}")
    os.makedirs(folder, exist_ok=True)
    # The row's figures (the PCA limit, the head's KL) travel with the weights, as numbers.
    metrics = {**ckpt["best_metrics"], **{k: v for k, v in row.items() if isinstance(v, float) and k not in ckpt["best_metrics"]}}
    save_checkpoint(os.path.join(folder, HUB_FILE), ckpt["compressor"], settings, ckpt["best_loss"], metrics)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(row, settings, repo))
    if os.path.exists(plot):
        shutil.copyfile(plot, os.path.join(folder, os.path.basename(plot)))
    return folder


def upload(folder: str, repo: str, private: bool) -> str:
    """The folder to the hub repo (created if missing); any failure is one line, the folder stays."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True, private=private)
        api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model",
                          commit_message="trm_ray: phase-1 compressor for LLM-TRM")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"upload to {repo} failed ({type(e).__name__}: {first}); the folder {folder} is kept: "
                        f"upload it later with `{upload_command(folder, repo)}`") from None
    return f"https://huggingface.co/{repo}"


def upload_command(folder: str, repo: str) -> str:
    return shlex.join(["hf", "upload", repo, folder, ".", "--repo-type", "model"])


def main(argv: list[str] | None = None) -> None:
    from trm_ray.cli import run_cli

    parser = argparse.ArgumentParser(prog="python -m trm_ray.publish", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="The sweep's --output_dir.")
    parser.add_argument("--d_compressed", type=int, required=True, help="The D' to publish.")
    parser.add_argument("--stage", choices=("1a", "1b"), default="1a", help="Which stage's compressor of that D'.")
    parser.add_argument("--repo", help="Hub repo (user/name) to upload to; without it the folder is only written.")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")

    def run() -> None:
        args = parser.parse_args(argv)
        folder = write_folder(args.output_dir, args.d_compressed, args.stage, args.repo)
        print(f"publish: {folder} holds {HUB_FILE}, README.md (the model card) and the sweep's plot", flush=True)
        if args.repo:
            print(f"publish: uploaded to {upload(folder, args.repo, args.private)}", flush=True)
        else:
            print(f"publish: to upload it: {upload_command(folder, 'USER/llm-trm-compressor-d' + str(args.d_compressed))}\n"
                  f"publish: phase 2 reads it as it is: python -m src.train.phase2_trm --compressor_checkpoint "
                  f"{os.path.join(folder, HUB_FILE)}", flush=True)

    run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
