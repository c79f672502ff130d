"""The hidden-state shards on disk: their layout, their manifest, and reading one side of the split.

A shard directory holds `shard-NNNNN.parquet` files, one row per real token
(`doc_id`, `position`, `token_id`, in stage 1b `region`, `hidden`), and a `manifest.json` written last: a
directory without a manifest is an unfinished extraction, never a usable one. Train and
validation are split by document, by a fixed rule on the document id, so every trial
and epoch sees the same held-out documents and never trains on them.
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from trm_ray.config import UserError
from trm_ray.files import filesystem, read_json

MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def read_manifest(shards_dir: str) -> dict[str, Any]:
    fs, root = filesystem(shards_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise UserError(f"shard directory {shards_dir} does not exist: run python -m trm_ray.extract first, or fix --shards_dir")
    manifest = read_json(posixpath.join(shards_dir, MANIFEST))
    if manifest is None:
        raise UserError(
            f"{shards_dir} has no {MANIFEST}: its extraction did not finish; rerun python -m trm_ray.extract to complete it"
        )
    return manifest


def shard_paths(shards_dir: str, manifest: dict[str, Any]) -> list[str]:
    return [posixpath.join(shards_dir, name) for name in manifest["shards"]]


def is_validation_doc(doc_ids: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A fixed pseudo-random rule on the document id: stable across trials, epochs and restarts."""
    h = (doc_ids.astype(np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(31)
    return (h % np.uint64(1_000_000)).astype(np.float64) < val_fraction * 1_000_000


def split_counts(manifest: dict[str, Any], val_fraction: float, seed: int) -> dict[str, int]:
    """Tokens and documents on each side of the split, from the manifest alone (no data pass)."""
    doc_tokens = np.asarray(manifest["doc_tokens"], dtype=np.int64)
    val = is_validation_doc(np.arange(len(doc_tokens)), val_fraction, seed)
    counts = {"train_docs": int((~val).sum()), "val_docs": int(val.sum()),
              "train_tokens": int(doc_tokens[~val].sum()), "val_tokens": int(doc_tokens[val].sum())}
    if counts["val_tokens"] == 0 or counts["train_tokens"] == 0:
        raise UserError(
            f"{manifest['num_docs']} documents are too few for a validation split of {val_fraction}: "
            "extract more (--num_samples) or change --val_fraction"
        )
    return counts


BLOCK_BYTES = 64 * 2**20  # Ray Data block size to aim for: big enough to stream fast, small enough to pipeline


def rows_per_block(manifest: dict[str, Any]) -> int:
    return max(1, BLOCK_BYTES // (manifest["hidden_size"] * value_bytes(manifest["storage_dtype"])))


def side_row_groups(meta: Any, val_fraction: float, seed: int, val_side: bool) -> list[int]:
    """The row groups of a shard that hold documents of one side of the split, from the doc_id
    statistics in its footer. Shards hold one document per row group, so a validation pass reads
    only validation rows (~10% of the bytes) and a training pass only training rows; a shard of
    an older layout (many documents per row group) is read whole and filtered."""
    column = meta.schema.names.index("doc_id")
    groups = []
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        docs = np.arange(stats.min, stats.max + 1) if stats is not None and stats.has_min_max else None
        if docs is None or (is_validation_doc(docs, val_fraction, seed) == val_side).any():
            groups.append(i)
    return groups


def side_tables(path: str, val_fraction: float, seed: int, val_side: bool, batch_size: int,
                columns: list[str] | None = None) -> Iterator[pa.Table]:
    """One shard's rows of one side of the split (validation or training), in order, in tables of
    at most `batch_size` rows; only the row groups of that side are read."""
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    with fs.open_input_file(p) as f:
        shard = pq.ParquetFile(f)
        groups = side_row_groups(shard.metadata, val_fraction, seed, val_side)
        if not groups:
            return
        for part in shard.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns):
            mask = is_validation_doc(part["doc_id"].to_numpy(), val_fraction, seed)
            yield pa.Table.from_batches([part]).filter(pa.array(mask if val_side else ~mask))


def value_bytes(storage_dtype: str) -> int:
    """Bytes per stored hidden-state value: bfloat16 bits (uint16) or float32."""
    return 2 if storage_dtype == "bfloat16" else 4


def verify_shards(shards_dir: str, manifest: dict[str, Any]) -> None:
    """Every shard is readable, has the manifest's hidden size, and all rows are there; from footers only."""
    import pyarrow.parquet as pq

    rows = 0
    for path in shard_paths(shards_dir, manifest):
        fs, p = filesystem(path)
        try:
            meta = pq.read_metadata(p, filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"shard {path} is missing, corrupt or truncated ({str(e).splitlines()[0][:120]}): "
                            "delete it and rerun python -m trm_ray.extract to re-create it") from None
        schema = meta.schema.to_arrow_schema()
        if manifest.get("regions") and "region" not in schema.names:
            raise UserError(f"shard {path} has no region column, which its manifest's stage 1b shards carry: "
                            "the directory mixes shard sets; re-extract into an empty --shards_dir")
        width = schema.field("hidden").type.list_size
        if width != manifest["hidden_size"]:
            raise UserError(f"shard {path} has hidden size {width}, the manifest says {manifest['hidden_size']}: "
                            "the directory mixes shard sets; re-extract into an empty --shards_dir")
        rows += meta.num_rows
    if rows != manifest["num_tokens"]:
        raise UserError(f"the shards in {shards_dir} hold {rows:,} rows, the manifest says {manifest['num_tokens']:,}: re-extract them")


def check_hidden_size(manifest: dict[str, Any], shards_dir: str, hidden_size: int, model_name: str) -> None:
    if manifest["hidden_size"] != hidden_size:
        raise UserError(
            f"shards in {shards_dir} have hidden size {manifest['hidden_size']} (model {manifest['model']}), "
            f"but {model_name} has {hidden_size}: point --shards_dir elsewhere or delete them to re-extract"
        )


def split_tables(shards_dir: str, val_fraction: float, seed: int, val_side: bool = True,
                 part: tuple[int, int] = (0, 1)) -> Iterator[pa.Table]:
    """The validation (or training) rows of each shard in turn (whole documents, in document order); with
    `part` (i, n), those of every n-th shard from the i-th: one of n tasks that share a pass over the shards."""
    manifest = read_manifest(shards_dir)
    for path in shard_paths(shards_dir, manifest)[part[0]::part[1]]:  # only that side's row groups
        yield from side_tables(path, val_fraction, seed, val_side, rows_per_block(manifest))


def region_code(manifest: dict[str, Any], region: str | None) -> int | None:
    """The `region` column's value for `region` (None: every row); a UserError for shards without it."""
    if region is None:
        return None
    if region not in manifest.get("regions", []):
        raise UserError(f"these shards have no {region!r} region (theirs: {manifest.get('regions') or 'none, stage 1a'}): "
                        "re-extract them as stage 1b shards")
    return manifest["regions"].index(region)
