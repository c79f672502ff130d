"""Hidden states between torch and the shards' Arrow columns: what extraction writes, and what the training
loop and the passes over the shards decode.

Apart from trm_ray.shards, which reads Parquet and cuts the split with pyarrow and numpy alone: Ray Data's read
tasks unpickle a function of that module, and each of their worker processes would otherwise import torch too.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from trm_ray.shards import split_tables


def encode_hidden(hidden: torch.Tensor, storage_dtype: str) -> pa.FixedSizeListArray:
    """[N, D] tensor -> one contiguous Arrow column of D-wide rows."""
    if storage_dtype == "bfloat16":
        flat = hidden.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    else:
        flat = hidden.to(torch.float32).contiguous().numpy().reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), hidden.shape[1])


def stored_hidden(column: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    """An Arrow `hidden` column -> [N, D] tensor in the shards' own dtype (bfloat16 or float32), without a
    per-row Python loop: what a training worker sends to its device, half the bytes of float32 for bf16
    shards, and converts there (`hidden_batches`), so the conversion is not on the CPU feed's path."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    # A copy either way: Arrow's buffers are read-only, torch tensors are not.
    if values.dtype == np.uint16:
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16).reshape(-1, width)
    return torch.from_numpy(values.copy()).reshape(-1, width)


def decode_hidden(column: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    """An Arrow `hidden` column -> float32 [N, D] tensor (bf16 values are exact in float32)."""
    return stored_hidden(column).float()


def next_tokens(t: pa.Table) -> torch.Tensor:
    """The next token of each row of `t` (-1: none stored): rows are whole documents in document order, so
    row i+1 is the next token of row i when it is the same document's next position."""
    doc, pos, tok = (t[c].to_numpy() for c in ("doc_id", "position", "token_id"))
    follows = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
    targets = np.full(len(doc), -1, dtype=np.int64)
    targets[:-1][follows] = tok[1:][follows]
    return torch.from_numpy(targets)


def validation_rows(shards_dir: str, val_fraction: float, seed: int,
                    max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_tokens` validation rows (None: all): hidden states [N, D] and the next token of each."""
    tables, n = [], 0
    for t in split_tables(shards_dir, val_fraction, seed):  # lazily: only as far as needed
        tables.append(t)
        n += t.num_rows
        if max_tokens is not None and n >= max_tokens:
            break
    t = pa.concat_tables(tables).slice(0, max_tokens)
    return decode_hidden(t["hidden"]), next_tokens(t)
