"""Extract once: tokens -> one layer's hidden states -> Parquet shards + manifest.json.

The LLM is ~99% of the compute of the seed's loop, which re-ran it inside every step of
every epoch of every trial. Here it runs once, on Ray actors (one model replica per GPU),
and every trial and epoch afterwards reads the shards.

Documents are grouped into fixed chunks of `docs_per_shard`; each chunk becomes one shard,
written to a temporary name and renamed when complete. An interrupted extraction therefore
resumes by skipping the shards that exist, and `manifest.json` is written last.
The text side (sources, chat rendering, which tokens are kept) is `trm_ray.text`; the model side
(its config, the layer and the cut that gives it, FLOPs per token) is `trm_ray.model`.

    python -m trm_ray.extract --config tune_configs/quickstart.yaml
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from trm_ray.config import Config, UserError, build_parser, config_from_args
from trm_ray.hidden import encode_hidden
from trm_ray.model import (CPU_FLOPS_PER_CORE, check_layer, flops_per_token, hidden_size_of, load_model,
                           load_model_config, model_id)
from trm_ray.files import atomic_output, check_writable, exists, filesystem, read_json, write_json
from trm_ray.shards import MANIFEST, check_hidden_size, shard_name, value_bytes
from trm_ray.text import REGIONS, chat_settings, check_dataset, load_tokenizer, read_documents, thinking_summary, tokenize
from trm_ray.tracking import publish


def length_batches(lengths: list[int], tokens_per_batch: int, max_batch: int) -> list[list[int]]:
    """Document indices grouped longest first, each group at most `max_batch` documents and
    `tokens_per_batch` padded tokens (a single longer document is a batch of its own).
    Sorted lengths keep the padding small; a token budget keeps the memory of a batch flat."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_batch and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= tokens_per_batch:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def hidden_rows(model: Any, token_lists: list[list[int]], pad_id: int, tokens_per_batch: int,
                max_batch: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """`model`'s last hidden state for every real token, in document order: ([N, D], doc index [N], position [N]).

    Sequences are right-padded within a batch; under causal attention the pad positions
    cannot change the real ones, and they are dropped here, so they never reach a shard.
    Values keep the model's dtype (bf16 on GPU): the shard's storage dtype decides the rest.
    """
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in token_lists]
    per_doc: list[torch.Tensor] = [torch.empty(0)] * len(token_lists)
    for batch in length_batches(lengths, tokens_per_batch, max_batch):
        width = len(token_lists[batch[0]])
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, doc in enumerate(batch):
            input_ids[row, :len(token_lists[doc])] = torch.tensor(token_lists[doc])
            mask[row, :len(token_lists[doc])] = 1
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        real = out[mask.bool().to(device)].cpu()  # one copy off the device per batch
        for doc, rows in zip(batch, real.split([lengths[d] for d in batch])):
            per_doc[doc] = rows
    docs = np.repeat(np.arange(len(token_lists)), lengths)
    return torch.cat(per_doc), docs, np.concatenate([np.arange(n) for n in lengths])


def shard_table(hidden: torch.Tensor, doc_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray,
                storage_dtype: str, regions: np.ndarray | None = None) -> pa.Table:
    """A shard's rows; `regions` (stage 1b): each row's index into `trm_ray.text.REGIONS`, the `region` column."""
    bad = int((~torch.isfinite(hidden)).any(dim=-1).sum())
    if bad:
        raise UserError(f"{bad} token rows have NaN/Inf hidden states: the model overflows in this dtype; try float32 on CPU")
    return pa.table({
        "doc_id": pa.array(doc_ids, pa.int64()),
        "position": pa.array(positions, pa.int32()),
        "token_id": pa.array(token_ids, pa.int32()),
        **({"region": pa.array(regions, pa.int8())} if regions is not None else {}),
        "hidden": encode_hidden(hidden, storage_dtype),
    })


class HiddenStateExtractor:
    """A Ray actor: one model replica that turns a chunk of documents into one shard.

    Two calls run at once on each replica (`run_replicas` keeps two in flight): one holds the model,
    the other tokenizes its documents or writes its shard meanwhile, so the forward passes never
    wait on tokenization or on the disk, and a call still returns only once its shard is written.
    """

    def __init__(self, cfg: dict[str, Any], storage_dtype: str, shards_dir: str):
        import ray

        self.cfg = Config(**cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":  # the CPUs this replica was scheduled with (never more than the node's cores)
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, min(int(cpus), os.cpu_count() or 1)))
        self.tokenizer, self.model, self.layer_cut = load_model(self.cfg.model_name, self.device, self.cfg.layer)
        self.model_lock = threading.Lock()
        self.storage_dtype, self.shards_dir = storage_dtype, shards_dir

    def extract(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """Write the shard of `chunk` ({shard, first_doc, docs}); returns its counts."""
        cfg = self.cfg
        tokens = tokenize(self.tokenizer, chunk["docs"], cfg)
        token_lists, keeps = tokens.ids, tokens.keeps
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with self.model_lock:
            hidden, doc_idx, pos = hidden_rows(self.model, token_lists, pad, cfg.extract_tokens_per_batch,
                                               cfg.extract_batch_size)
        keep = np.concatenate(keeps)  # hidden_rows emits documents in order, positions ascending
        if cfg.exclude_first_token:
            keep &= pos > 0
        outliers = 0
        if cfg.outlier_norm_factor > 0:
            norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32).numpy()
            big = keep & (norms > cfg.outlier_norm_factor * np.median(norms[keep]))
            outliers, keep = int(big.sum()), keep & ~big
        token_ids = np.concatenate([np.asarray(ids, dtype=np.int32) for ids in token_lists])[keep]
        regions = np.concatenate(tokens.regions)[keep] if tokens.regions is not None else None
        hidden, doc_idx, pos = hidden[torch.from_numpy(keep)], doc_idx[keep], pos[keep]
        table = shard_table(hidden, doc_idx + chunk["first_doc"], pos, token_ids, self.storage_dtype, regions)
        table = table.replace_schema_metadata({LAYER_CUT: self.layer_cut})  # how its rows were made, for the manifest
        write_shard(table, posixpath.join(self.shards_dir, shard_name(chunk["shard"])))
        return {"shard": chunk["shard"], "num_docs": len(token_lists), "num_tokens": len(doc_idx),
                "doc_tokens": np.bincount(doc_idx, minlength=len(token_lists)).tolist(), "outliers": outliers}


# A local Ray has no autoscaler: resources a replica has waited this long for are held by something else.
RESOURCE_WAIT_S = 120.0
# Restarts of a replica that died (a preempted node, a kill for memory) before extraction gives up and says why.
REPLICA_RESTARTS = 3


def run_replicas(cfg: Config, place: Placement, storage_dtype: str, shards_dir: str,
                 chunks: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every chunk's shard, made by `place.replicas` model replicas with two chunks in flight each;
    yields each chunk's counts as its shard is written.

    A replica that dies (a preempted GPU node, a killed process) is restarted and its chunks run
    again, up to REPLICA_RESTARTS times: one killed for memory would die on every retry. Plain actors
    built from a few settings, not a Ray Data actor pool: Ray Data hands its pool's actors their
    function and context as object references, and Ray logs an alarm for every restartable actor
    built from one (`core_worker.cc ... constructor arguments in the object store`)."""
    import ray

    replica = ray.remote(HiddenStateExtractor).options(
        num_cpus=place.num_cpus, num_gpus=place.num_gpus or None, max_concurrency=2, max_restarts=REPLICA_RESTARTS,
        max_task_retries=-1)
    replicas = [replica.remote(dataclasses.asdict(cfg), storage_dtype, shards_dir) for _ in range(place.replicas)]
    waiting, running = chunks[::-1], {}
    for r in replicas * 2:
        if waiting:
            running[r.extract.remote(waiting.pop())] = r
    try:
        while running:
            finished, _ = ray.wait(list(running), timeout=RESOURCE_WAIT_S)
            if not finished:
                check_scheduled(cfg, place)
                continue
            r = running.pop(finished[0])
            if waiting:
                running[r.extract.remote(waiting.pop())] = r
            try:
                yield ray.get(finished[0])
            except ray.exceptions.ActorDiedError as e:
                raise UserError(f"an extraction replica died {REPLICA_RESTARTS + 1} times ({replica_death(e)}): on a "
                                "kill for memory, lower --extract_tokens_per_batch or --extract_batch_size") from e
    finally:  # done or failed: the replicas' models and resources are freed now, not when Python collects them
        for r in replicas:
            ray.kill(r)


def replica_death(error: Exception) -> str:
    """Why Ray says the actor died, in one short clause."""
    text = " ".join(str(error).split())
    return "out of memory" if "memory" in text.lower() else text[:200]


def check_scheduled(cfg: Config, place: Placement) -> None:
    """After RESOURCE_WAIT_S without a shard: replicas that are still not placed wait for resources held
    elsewhere. A local Ray never frees them by itself: fail, naming what holds them; a cluster's autoscaler
    may still add a node: say so and wait on."""
    import ray
    from ray.util.state import list_actors

    pending = [a for a in list_actors(filters=[("class_name", "=", "HiddenStateExtractor"),
                                               ("state", "=", "PENDING_CREATION"),
                                               ("job_id", "=", ray.get_runtime_context().get_job_id())])
               if not a.pid]  # a replica with a process of its own is placed, and still loading its model
    if not pending:
        return  # placed and working: a slow model, not a wait
    asks = f"{len(pending)} extraction replica(s) of {place.num_cpus} CPU(s){' and 1 GPU' if place.num_gpus else ''}"
    if cfg.address:
        print(f"extract: {asks} still wait for resources ({held_by()}); an autoscaler adds nodes for them", flush=True)
        return
    raise UserError(f"{asks} waited {RESOURCE_WAIT_S:g} s for resources that never came: {held_by()}; "
                    "end what holds them (another job, a killed run's placement groups) or pass --num_cpus")


def held_by() -> str:
    """What holds the local Ray's resources, in words: what is free, and the placement groups that hold the rest."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    held = {}
    for g in groups:
        for bundle in g["bundles"].values():
            for name, amount in bundle.items():
                held[name] = held.get(name, 0) + amount
    resources = ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k} free" for k in ("CPU", "GPU") if k in total)
    pgs = (f"{len(groups)} placement group(s) hold {', '.join(f'{v:g} {k}' for k, v in sorted(held.items()))} "
           f"({', '.join(g['name'] or g['placement_group_id'][:12] for g in groups[:4])})" if groups else "no placement group")
    return f"{resources}; {pgs}"


def write_shard(table: pa.Table, path: str) -> None:
    """Temporary name, then rename: a shard that exists under its real name is complete.

    One row group per document (rows come in document order): a pass over the validation
    documents then reads only their row groups (`shards.side_row_groups`), not every shard whole."""
    doc = table["doc_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]]) if len(doc) else np.array([], dtype=int)
    with atomic_output(path) as (fs, p), pq.ParquetWriter(p, table.schema, filesystem=fs) as writer:
        for start, end in zip(starts, [*starts[1:], len(doc)]):
            writer.write_table(table.slice(start, end - start))


# --- driver -------------------------------------------------------------------------------

def extraction_settings(cfg: Config, hidden_size: int, storage_dtype: str, chat: dict[str, Any] | None = None) -> dict[str, Any]:
    """What defines a shard set: if any of it changes, the shards are a different data set.
    `chat` (stage 1b) is `trm_ray.text.chat_settings`: the chat template's hash and pinned variables."""
    return {
        "model": cfg.model_name, "layer": cfg.layer, "hidden_size": hidden_size, "storage_dtype": storage_dtype,
        "stage": cfg.stage, "keep_tokens": cfg.kept_tokens,
        "source": {"dataset": cfg.dataset, "dataset_config": cfg.dataset_config, "dataset_split": cfg.dataset_split,
                   "field": getattr(cfg, cfg.document_field)},
        "num_samples": cfg.num_samples, "max_seq_length": cfg.max_seq_length, "docs_per_shard": cfg.docs_per_shard,
        "exclude_first_token": cfg.exclude_first_token, "outlier_norm_factor": cfg.outlier_norm_factor, "chat": chat,
        # Stage 1b shards carry each row's region, as an index into this list (trm_ray.text.REGIONS).
        **({"regions": list(REGIONS)} if cfg.stage == "1b" else {}),
    }


@dataclass(frozen=True)
class Placement:
    """Where extraction runs: `replicas` model copies, each requesting `num_gpus` GPUs and `num_cpus` CPUs."""

    replicas: int
    num_gpus: int
    num_cpus: int


def placement(cfg: Config, cluster_gpus: float, node_cpus: float, cluster_cpus: float) -> Placement:
    """Decided by the configuration, not by what the cluster has at this moment.

    With --use_gpu every replica requests a GPU even while the cluster has none (an autoscaling
    cluster starts without GPU workers; the request is what makes it add them); one replica per
    GPU present, at least one. On CPU, one replica (unless --num_extract_workers) with the CPUs
    of a node, which become its torch threads; `cluster_cpus` is what a local Ray has free.
    """
    if cfg.use_gpu:
        return Placement(replicas=cfg.num_extract_workers or max(1, int(cluster_gpus)), num_gpus=1, num_cpus=1)
    replicas = cfg.num_extract_workers or 1
    return Placement(replicas=replicas, num_gpus=0, num_cpus=max(1, int(min(node_cpus, cluster_cpus // replicas))))


def announce(cfg: Config, place: Placement, cluster_gpus: float, max_tokens: int) -> None:
    """Say where extraction runs, and on CPU how long it may take, before it starts."""
    if place.num_gpus:
        print(f"extract: {place.replicas} replica(s), {place.num_gpus} GPU each, bf16 weights and SDPA attention "
              f"(the cluster has {cluster_gpus:g} GPU(s) now; an autoscaler adds them for the requests)", flush=True)
        return
    flops = flops_per_token(load_model_config(cfg.model_name), cfg.layer)
    cores = place.replicas * place.num_cpus
    seconds = max_tokens * flops / (cores * CPU_FLOPS_PER_CORE)
    took = (f"{seconds / 86400:,.1f} days" if seconds > 86400 else f"{seconds / 3600:.2g} hours" if seconds > 3600
            else f"{seconds / 60:.2g} minutes" if seconds > 60 else f"{seconds:.2g} seconds")
    print(f"extract: on CPU ({place.replicas} replica(s) x {place.num_cpus} CPU(s)): up to {max_tokens:,} tokens x "
          f"{flops / 1e9:.3g} GFLOP/token: at best ~{took} at {CPU_FLOPS_PER_CORE / 1e9:g} GFLOP/s a core", flush=True)
    if seconds > 86400:
        print("extract: WARNING: extracting this model on CPU takes days; pass --use_gpu to extract on GPUs", flush=True)
    if cluster_gpus:
        print(f"extract: the cluster has {cluster_gpus:g} GPU(s): pass --use_gpu to extract on them", flush=True)


def resolve_storage_dtype(cfg: Config) -> str:
    """'auto' is the dtype the model runs in: bf16 on GPUs (--use_gpu), float32 on CPU."""
    if cfg.storage_dtype != "auto":
        return cfg.storage_dtype
    return "bfloat16" if cfg.use_gpu else "float32"


LAYER_CUT = "layer_cut"  # the shards' metadata key, and the manifest's: `trm_ray.model.cut_or_whole`'s path


def layer_cut(shards_dir: str) -> str | None:
    """How the first shard's rows were extracted (the model's blocks cut, or its hidden_states): every
    replica loads the same model the same way. None for shards written before it was recorded."""
    fs, root = filesystem(shards_dir)
    metadata = pq.read_schema(posixpath.join(root, shard_name(0)), filesystem=fs).metadata or {}
    value = metadata.get(LAYER_CUT.encode())
    return value.decode() if value is not None else None


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


def summarize(tokenizer: Any, docs: list[Any], cfg: Config) -> str:
    """Stage 1b's `thinking_summary`, tokenizing one shard's conversations at a time: every conversation's
    tokens and offsets at once would hold ~3 GB in the driver at 4,000 conversations of 8k tokens."""
    n = cfg.docs_per_shard
    return thinking_summary((tokenize(tokenizer, docs[i:i + n], cfg) for i in range(0, len(docs), n)), cfg)


def extract(cfg: Config) -> dict[str, Any]:
    """Make sure complete shards for `cfg` exist; returns their manifest."""
    import ray

    shards_dir = cfg.shards_path
    hidden_size = hidden_size_of(cfg.model_name)
    check_layer(cfg.model_name, cfg.layer)
    manifest = read_json(posixpath.join(shards_dir, MANIFEST))
    storage_dtype = manifest["storage_dtype"] if manifest and cfg.storage_dtype == "auto" else resolve_storage_dtype(cfg)
    tokenizer = load_tokenizer(cfg.model_name) if cfg.stage == "1b" else None
    settings = extraction_settings(cfg, hidden_size, storage_dtype, chat_settings(tokenizer, cfg))
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

    docs = read_documents(cfg)
    if tokenizer is not None:  # before any model is loaded: a corpus without thinking fails here
        print(f"extract: {summarize(tokenizer, docs, cfg)}", flush=True)
    check_writable(shards_dir, "shards_dir")  # an unwritable one would read as a disk with 0 GiB free
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
        cluster = ray.cluster_resources()
        node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
        # A local Ray has no autoscaler: its replicas ask for the CPUs free now, never for ones another job holds.
        cpus = cluster.get("CPU", 1) if cfg.address else ray.available_resources().get("CPU", 0)
        place = placement(cfg, cluster.get("GPU", 0), node_cpus, cpus)
        docs_todo = sum(len(c["docs"]) for c in todo)
        announce(cfg, place, cluster.get("GPU", 0), docs_todo * cfg.max_seq_length)
        t0, docs, tokens = time.time(), 0, 0
        for row in run_replicas(cfg, place, storage_dtype, shards_dir, todo):
            done[row["shard"]] = row["doc_tokens"]
            outliers[row["shard"]] = row["outliers"]
            docs += row["num_docs"]
            tokens += row["num_tokens"]
            elapsed = time.time() - t0
            eta = elapsed / docs * (docs_todo - docs)
            print(f"extract: {len(done)}/{num_shards} shards | {tokens:,} tokens | {tokens / elapsed:,.0f} tokens/s "
                  f"| ETA {eta:.0f}s", flush=True)
            publish({"extract_tokens": tokens, "extract_tokens_per_s": tokens / elapsed}, shards=shards_dir, stage=cfg.stage)

    doc_tokens = [c for i in range(num_shards) for c in done[i]]
    manifest = {
        **settings,
        "revision": getattr(load_model_config(cfg.model_name), "_commit_hash", None), LAYER_CUT: layer_cut(shards_dir),
        "num_docs": len(doc_tokens), "num_tokens": int(sum(doc_tokens)), "outlier_tokens_dropped": sum(outliers.values()),
        "shards": [shard_name(i) for i in range(num_shards)], "doc_tokens": doc_tokens,
    }
    write_json(posixpath.join(shards_dir, MANIFEST), manifest)
    print(f"extract: wrote {manifest['num_tokens']:,} token rows of {manifest['num_docs']} documents; "
          f"manifest {posixpath.join(shards_dir, MANIFEST)}", flush=True)
    return manifest


def check_before_ray(cfg: Config) -> None:
    """The mistakes a user can fix, found in seconds: Ray takes a minute to start on a busy machine, and an
    unwritable directory would surface only at its first write, as a disk-space or pyarrow error."""
    check_dataset(cfg.dataset)
    load_model_config(cfg.model_name)
    check_writable(cfg.output_dir, "output_dir")
    if not exists(posixpath.join(cfg.shards_path, MANIFEST)):  # complete shards are only read
        check_writable(cfg.shards_path, "shards_dir")


def main(argv: list[str] | None = None) -> None:
    from trm_ray.cli import run_cli
    from trm_ray.cluster import connect

    parser = build_parser("python -m trm_ray.extract", __doc__.splitlines()[0])

    def run() -> None:
        cfg = config_from_args(parser.parse_args(argv))
        cfg = dataclasses.replace(cfg, model_name=model_id(cfg.model_name))
        check_before_ray(cfg)
        connect(cfg)
        extract(cfg)

    run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
