"""Extract once: tokens -> one layer's hidden states -> Parquet shards + manifest.json.

The LLM is ~99% of the compute of the seed's loop, which re-ran it inside every step of
every epoch of every trial. Here it runs once, in a Ray Data actor pool (one model replica
per GPU), and every trial and epoch afterwards reads the shards.

Documents are grouped into fixed chunks of `docs_per_shard`; each chunk becomes one shard,
written to a temporary name and renamed when complete. An interrupted extraction therefore
resumes by skipping the shards that exist, and `manifest.json` is written last.
The text side (sources, chat rendering, which tokens are kept) is `trm_ray.text`.

    python -m trm_ray.extract --config tune_configs/quickstart.yaml
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from trm_ray.config import Config, UserError, build_parser, config_from_args
from trm_ray.shards import (MANIFEST, check_hidden_size, encode_hidden, filesystem, read_json, shard_name,
                            value_bytes, write_json)
from trm_ray.text import looks_like_path, read_documents, tokenize
from trm_ray.tracking import publish


def load_model_config(model_name: str) -> Any:
    """The model's config, with a one-line error for a path that is not there."""
    from transformers import AutoConfig

    if not os.path.exists(model_name) and looks_like_path(model_name):
        raise UserError(f"model path {model_name} does not exist: give a local model directory or a hub id")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {model_name}: {str(e).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{model_name} is a {config.model_type!r} model without a causal-LM head (an encoder or "
                        "encoder-decoder): give a causal (decoder-only) LM")
    return config.get_text_config()


def hidden_size_of(model_name: str) -> int:
    return int(load_model_config(model_name).hidden_size)


def check_layer(cfg: Config) -> None:
    """hidden_states has num_hidden_layers + 1 entries (the embeddings first): --layer must index one."""
    layers = int(load_model_config(cfg.model_name).num_hidden_layers)
    if not -(layers + 1) <= cfg.layer <= layers:
        raise UserError(f"layer {cfg.layer} is outside {cfg.model_name}'s hidden states: give -{layers + 1}..{layers} "
                        f"(0 the embeddings, {layers} or -1 the last layer)")


def model_id(model_name: str) -> str:
    """A local model directory made absolute (workers run elsewhere, and the manifest must not depend on the
    current directory); a hub id as it is. Every entry point names the model this way."""
    return os.path.abspath(model_name) if os.path.exists(model_name) else model_name


def load_model(model_name: str, device: torch.device) -> tuple[Any, Any]:
    """Tokenizer and model; bf16 on GPU (as the model is served), float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_model_config(model_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype).to(device).eval()
    return tokenizer, model


@torch.no_grad()
def hidden_rows(model: Any, token_lists: list[list[int]], layer: int, batch_size: int,
                pad_id: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Hidden states of `layer` for every real token: ([N, D], doc index [N], position [N]).

    Sequences are right-padded within a batch; under causal attention the pad positions
    cannot change the real ones, and they are dropped here, so they never reach a shard.
    """
    device = next(model.parameters()).device
    hidden, docs, positions = [], [], []
    for start in range(0, len(token_lists), batch_size):
        batch = token_lists[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        real = mask.bool()
        hidden.append(out.hidden_states[layer][real.to(device)].float().cpu())
        rows, cols = real.nonzero(as_tuple=True)
        docs.append((rows + start).numpy())
        positions.append(cols.numpy())
    return torch.cat(hidden), np.concatenate(docs), np.concatenate(positions)


def shard_table(hidden: torch.Tensor, doc_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray,
                storage_dtype: str) -> pa.Table:
    bad = int((~torch.isfinite(hidden)).any(dim=-1).sum())
    if bad:
        raise UserError(f"{bad} token rows have NaN/Inf hidden states: the model overflows in this dtype; try float32 on CPU")
    return pa.table({
        "doc_id": pa.array(doc_ids, pa.int64()),
        "position": pa.array(positions, pa.int32()),
        "token_id": pa.array(token_ids, pa.int32()),
        "hidden": encode_hidden(hidden, storage_dtype),
    })


class HiddenStateExtractor:
    """A Ray Data actor: one model replica that turns a chunk of documents into one shard."""

    def __init__(self, cfg: dict[str, Any], storage_dtype: str, shards_dir: str):
        self.cfg = Config(**cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer, self.model = load_model(self.cfg.model_name, self.device)
        self.storage_dtype, self.shards_dir = storage_dtype, shards_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        out: dict[str, list] = {"shard": [], "num_docs": [], "num_tokens": [], "doc_tokens": [], "outliers": []}
        for shard, first_doc, docs in zip(batch["shard"], batch["first_doc"], batch["docs"]):
            token_lists, keeps = tokenize(self.tokenizer, [json.loads(d) for d in docs], cfg.max_seq_length, cfg.kept_tokens)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            hidden, doc_idx, pos = hidden_rows(self.model, token_lists, cfg.layer, cfg.extract_batch_size, pad)
            keep = np.concatenate(keeps)  # hidden_rows emits documents in order, positions ascending
            if cfg.exclude_first_token:
                keep &= pos > 0
            outliers = 0
            if cfg.outlier_norm_factor > 0:
                norms = hidden.norm(dim=-1).numpy()
                big = keep & (norms > cfg.outlier_norm_factor * np.median(norms[keep]))
                outliers, keep = int(big.sum()), keep & ~big
            hidden, doc_idx, pos = hidden[torch.from_numpy(keep)], doc_idx[keep], pos[keep]
            token_ids = np.array([token_lists[d][p] for d, p in zip(doc_idx, pos)], dtype=np.int32)
            table = shard_table(hidden, doc_idx + int(first_doc), pos, token_ids, self.storage_dtype)
            write_shard(table, posixpath.join(self.shards_dir, shard_name(int(shard))))
            out["shard"].append(int(shard))
            out["num_docs"].append(len(token_lists))
            out["num_tokens"].append(len(doc_idx))
            out["doc_tokens"].append(json.dumps(np.bincount(doc_idx, minlength=len(token_lists)).tolist()))
            out["outliers"].append(outliers)
        return {k: np.array(v) for k, v in out.items()}


def write_shard(table: pa.Table, path: str) -> None:
    """Temporary name, then rename: a shard that exists under its real name is complete.

    One row group per document (rows come in document order): a pass over the validation
    documents then reads only their row groups (`shards.side_row_groups`), not every shard whole."""
    fs, p = filesystem(path)
    tmp = posixpath.join(posixpath.dirname(p), "." + posixpath.basename(p) + ".tmp")
    doc = table["doc_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]]) if len(doc) else np.array([], dtype=int)
    with pq.ParquetWriter(tmp, table.schema, filesystem=fs) as writer:
        for start, end in zip(starts, [*starts[1:], len(doc)]):
            writer.write_table(table.slice(start, end - start))
    fs.move(tmp, p)


# --- driver -------------------------------------------------------------------------------

def extraction_settings(cfg: Config, hidden_size: int, storage_dtype: str) -> dict[str, Any]:
    """What defines a shard set: if any of it changes, the shards are a different data set."""
    return {
        "model": cfg.model_name, "layer": cfg.layer, "hidden_size": hidden_size, "storage_dtype": storage_dtype,
        "stage": cfg.stage, "keep_tokens": cfg.kept_tokens,
        "source": {"dataset": cfg.dataset, "dataset_config": cfg.dataset_config, "dataset_split": cfg.dataset_split,
                   "field": getattr(cfg, cfg.document_field)},
        "num_samples": cfg.num_samples, "max_seq_length": cfg.max_seq_length, "docs_per_shard": cfg.docs_per_shard,
        "exclude_first_token": cfg.exclude_first_token, "outlier_norm_factor": cfg.outlier_norm_factor,
    }


def resolve_storage_dtype(cfg: Config) -> str:
    if cfg.storage_dtype != "auto":
        return cfg.storage_dtype
    import ray

    return "bfloat16" if ray.cluster_resources().get("GPU", 0) > 0 else "float32"


def _existing_shard_counts(shards_dir: str, num_docs: int, docs_per_shard: int) -> dict[int, list[int]]:
    """Per-document token counts of shards a previous run completed (read from their doc_id column)."""
    fs, root = filesystem(shards_dir)
    counts = {}
    for i in range((num_docs + docs_per_shard - 1) // docs_per_shard):
        path = posixpath.join(root, shard_name(i))
        if fs.get_file_info(path).type == pafs.FileType.File:
            ids = pq.read_table(path, columns=["doc_id"], filesystem=fs)["doc_id"].to_numpy() - i * docs_per_shard
            counts[i] = np.bincount(ids, minlength=min(docs_per_shard, num_docs - i * docs_per_shard)).tolist()
    return counts


def check_disk(cfg: Config, shards_dir: str, need: int) -> None:
    """Say what the shards will take (at most: every document at max_seq_length), and refuse when it cannot fit."""
    where = "free space unknown"
    if "://" not in shards_dir:
        existing = os.path.abspath(shards_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        free = shutil.disk_usage(existing).free
        where = f"{free / 2**30:,.2f} GiB free"
        if need > free and not cfg.skip_disk_check:
            raise UserError(f"the shards may take {need / 2**30:,.2f} GiB but {shards_dir} has {free / 2**30:,.2f} GiB free: "
                            "free space, point --shards_dir elsewhere, or pass --skip_disk_check")
    print(f"extract: shards will take at most {need / 2**30:,.3f} GiB ({where})", flush=True)


def extract(cfg: Config) -> dict[str, Any]:
    """Make sure complete shards for `cfg` exist; returns their manifest."""
    import ray

    shards_dir = cfg.shards_path
    hidden_size = hidden_size_of(cfg.model_name)
    check_layer(cfg)
    manifest = read_json(posixpath.join(shards_dir, MANIFEST))
    storage_dtype = manifest["storage_dtype"] if manifest and cfg.storage_dtype == "auto" else resolve_storage_dtype(cfg)
    settings = extraction_settings(cfg, hidden_size, storage_dtype)
    if manifest is not None:
        check_hidden_size(manifest, shards_dir, hidden_size, cfg.model_name)
        changed = sorted(k for k in settings if manifest.get(k) != settings[k])
        if changed:
            raise UserError(
                f"{shards_dir} holds shards extracted with other settings ({', '.join(changed)} differ): "
                "choose another --shards_dir, or delete it to re-extract"
            )
        return manifest
    started = read_json(posixpath.join(shards_dir, "extraction.json"))
    if started is not None and started != settings:
        raise UserError(f"{shards_dir} holds an unfinished extraction with other settings: delete it or choose another --shards_dir")

    docs = [json.dumps(d) for d in read_documents(cfg)]
    check_disk(cfg, shards_dir, len(docs) * cfg.max_seq_length * hidden_size * value_bytes(storage_dtype))
    write_json(posixpath.join(shards_dir, "extraction.json"), settings)
    n = cfg.docs_per_shard
    num_shards = (len(docs) + n - 1) // n
    done = _existing_shard_counts(shards_dir, len(docs), n)
    outliers = dict.fromkeys(done, 0)  # unknown for shards of an earlier, interrupted run
    todo = [{"shard": i, "first_doc": i * n, "docs": docs[i * n:(i + 1) * n]} for i in range(num_shards) if i not in done]
    print(f"extract: {len(docs)} documents -> {num_shards} shards in {shards_dir} "
          f"({len(done)} already done), model {cfg.model_name}, layer {cfg.layer}, D={hidden_size}, {storage_dtype}",
          flush=True)
    if todo:
        gpus = ray.cluster_resources().get("GPU", 0)
        replicas = cfg.num_extract_workers or max(1, int(gpus))
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            HiddenStateExtractor,
            fn_constructor_kwargs=dict(cfg=dataclasses.asdict(cfg), storage_dtype=storage_dtype, shards_dir=shards_dir),
            batch_size=1, concurrency=replicas, num_gpus=1 if gpus else None,
        )
        docs_todo = sum(len(c["docs"]) for c in todo)
        t0, docs, tokens = time.time(), 0, 0
        for row in ds.iter_rows():
            done[int(row["shard"])] = json.loads(row["doc_tokens"])
            outliers[int(row["shard"])] = int(row["outliers"])
            docs += int(row["num_docs"])
            tokens += int(row["num_tokens"])
            elapsed = time.time() - t0
            eta = elapsed / docs * (docs_todo - docs)
            print(f"extract: {len(done)}/{num_shards} shards | {tokens:,} tokens | {tokens / elapsed:,.0f} tokens/s "
                  f"| ETA {eta:.0f}s", flush=True)
            publish({"extract_tokens": tokens, "extract_tokens_per_s": tokens / elapsed}, shards=shards_dir, stage=cfg.stage)

    doc_tokens = [c for i in range(num_shards) for c in done[i]]
    manifest = {
        **settings,
        "revision": getattr(load_model_config(cfg.model_name), "_commit_hash", None),
        "num_docs": len(doc_tokens), "num_tokens": int(sum(doc_tokens)), "outlier_tokens_dropped": sum(outliers.values()),
        "shards": [shard_name(i) for i in range(num_shards)], "doc_tokens": doc_tokens,
    }
    write_json(posixpath.join(shards_dir, MANIFEST), manifest)
    print(f"extract: wrote {manifest['num_tokens']:,} token rows of {manifest['num_docs']} documents; "
          f"manifest {posixpath.join(shards_dir, MANIFEST)}", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> None:
    from trm_ray.cli import connect, run_cli

    parser = build_parser("python -m trm_ray.extract", __doc__.splitlines()[0])

    def run() -> None:
        cfg = config_from_args(parser.parse_args(argv))
        cfg = dataclasses.replace(cfg, model_name=model_id(cfg.model_name))
        connect(cfg)
        extract(cfg)

    run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
