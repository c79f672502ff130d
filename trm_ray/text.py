"""Text -> tokens: where documents come from, how a conversation is rendered, which tokens are kept.

The other half of extraction (tokens -> hidden states -> shards) is `trm_ray.extract`; this
module never touches the model, only its tokenizer, so what reaches the shards can be
checked without running an LLM.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from trm_ray.config import Config, UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(LOCAL_SUFFIXES) or name.count("/") > 1


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith(LOCAL_SUFFIXES))
        if not files:
            raise UserError(f"{path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    return [path]


def _records_from_file(path: str) -> Iterable[dict[str, Any]]:
    if path.endswith(".parquet"):
        # Batch by batch: only the first num_samples documents are ever held, however large the file.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif path.endswith(".txt"):
        # Documents are separated by blank lines.
        with open(path) as f:
            for block in f.read().split("\n\n"):
                yield {"text": block.strip()}
    elif path.endswith(".json") and _starts_with(path, "["):  # one JSON array of records
        with open(path) as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        for n, record in enumerate(records):
            yield _record(record, f"{path}[{n}]")
    else:  # JSON Lines, also under a .json name
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{n} is not valid JSON") from None
                    yield _record(record, f"{path}:{n}")


def _starts_with(path: str, char: str) -> bool:
    with open(path) as f:
        return f.read(4096).lstrip().startswith(char)


def _record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, not an object of fields: "
                        "give one JSON object per line, or a JSON array of objects")
    return record


def read_records(cfg: Config) -> Iterable[dict[str, Any]]:
    """Records from local files, or streamed from the hub (nothing is downloaded whole)."""
    if os.path.exists(cfg.dataset):
        for path in _local_files(cfg.dataset):
            yield from _records_from_file(path)
    elif looks_like_path(cfg.dataset):
        raise UserError(f"dataset {cfg.dataset} does not exist: give an existing file or directory, or a hub dataset id")
    else:
        import datasets

        yield from datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split, streaming=True)


def read_documents(cfg: Config) -> list[Any]:
    """The first `num_samples` documents: texts (stage 1a) or conversations (stage 1b)."""
    key = getattr(cfg, cfg.document_field)
    docs = []
    for record in read_records(cfg):
        if key not in record:
            raise UserError(f"records of {cfg.dataset} have no {key!r} field (they have {sorted(record)}): set --{cfg.document_field}")
        doc = record[key]
        if (isinstance(doc, str) and doc.strip()) or (isinstance(doc, list) and doc):
            docs.append(doc)
            if len(docs) == cfg.num_samples:
                break
    if not docs:
        raise UserError(f"dataset {cfg.dataset} holds no non-empty {key!r} documents")
    return docs


def tokenize(tokenizer: Any, docs: list[Any], max_seq_length: int, keep_tokens: str = "all") -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of each document, and which of its positions to keep.

    A conversation (stage 1b) is rendered with the tokenizer's chat template, thinking on;
    with keep_tokens="thinking" only the tokens strictly between <think> and </think> are
    kept (a span cut off by max_seq_length is kept up to the cut).
    """
    if docs and isinstance(docs[0], list):
        texts = [tokenizer.apply_chat_template(d, tokenize=False, enable_thinking=True) for d in docs]
        ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_seq_length)["input_ids"]
    else:
        ids = tokenizer(list(docs), truncation=True, max_length=max_seq_length)["input_ids"]
    if keep_tokens == "all":
        return ids, [np.ones(len(t), dtype=bool) for t in ids]
    open_id, close_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
    if tokenizer.unk_token_id in (open_id, close_id) or None in (open_id, close_id):
        raise UserError("the tokenizer has no <think> / </think> tokens: use --keep_tokens all")
    keeps = []
    for t in ids:
        arr = np.asarray(t)
        depth = np.cumsum(arr == open_id) - np.cumsum(arr == close_id)
        keeps.append((depth > 0) & (arr != open_id))
    return ids, keeps
