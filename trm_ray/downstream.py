"""What matters downstream: the LM head reading the reconstruction instead of the original.

For a last-layer sweep (`hidden_states[-1]` is the final norm's output, which the LM head
reads), the next-token distribution on the reconstructed state is compared with the one on
the original: the KL divergence KL(p_original || p_reconstructed) per token, and the
increase of the cross-entropy on the true next token. The same is computed for the PCA
reconstruction of each D', so a trained compressor can be set against the optimum.
Runs as one Ray task (on a GPU where the cluster has one) over the first validation tokens.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from trm_ray.compressor import DimensionCompressor
from trm_ray.shards import decode_hidden, read_manifest, rows_per_block, shard_paths, side_tables
from trm_ray.spectrum import eigenvectors


def validation_rows(shards_dir: str, val_fraction: float, seed: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_tokens` validation rows: hidden states [N, D] and the next token of each (-1: none stored)."""
    manifest = read_manifest(shards_dir)
    tables, n = [], 0
    parts = (side_tables(p, val_fraction, seed, True, rows_per_block(manifest)) for p in shard_paths(shards_dir, manifest))
    for t in itertools.chain.from_iterable(parts):  # only the validation row groups, only as far as needed
        tables.append(t)
        n += t.num_rows
        if n >= max_tokens:
            break
    t = pa.concat_tables(tables).slice(0, max_tokens)
    doc, pos, tok = (t[c].to_numpy() for c in ("doc_id", "position", "token_id"))
    # Rows are in document order: row i+1 is the next token of row i when it is the same document's next position.
    follows = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
    targets = np.full(len(doc), -1, dtype=np.int64)
    targets[:-1][follows] = tok[1:][follows]
    return decode_hidden(t["hidden"]), torch.from_numpy(targets)


@torch.no_grad()
def next_token_damage(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                      reconstruct: Callable[[torch.Tensor], torch.Tensor], batch: int = 256) -> dict[str, float]:
    """Mean KL(p(x) || p(x̂)) over tokens, and mean CE(x̂) - CE(x) over tokens with a known next token."""
    kl_sum, ce_sum, n_ce = 0.0, 0.0, 0
    device = next(lm_head.parameters()).device
    for i in range(0, hidden.shape[0], batch):
        x = hidden[i:i + batch].to(device)
        t = targets[i:i + batch].to(device)
        logp = torch.log_softmax(lm_head(x.to(lm_head.weight.dtype)).float(), -1)
        logq = torch.log_softmax(lm_head(reconstruct(x).to(lm_head.weight.dtype)).float(), -1)
        kl_sum += float((logp.exp() * (logp - logq)).sum())
        known = t >= 0
        ce_sum += float((logp[known, t[known]] - logq[known, t[known]]).sum())
        n_ce += int(known.sum())
    return {"kl": kl_sum / hidden.shape[0], "ce_increase": ce_sum / max(n_ce, 1)}


def measure(model_name: str, shards_dir: str, val_fraction: float, seed: int, max_tokens: int,
            checkpoints: dict[int, str]) -> dict[int, dict[str, float]]:
    """For each D': KL and CE increase of the exported compressor and of the PCA reconstruction."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm_head = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype).get_output_embeddings().to(device).eval()
    hidden, targets = validation_rows(shards_dir, val_fraction, seed, max_tokens)
    vecs = eigenvectors(shards_dir, val_fraction, seed).float().to(device)
    out = {}
    for d, path in checkpoints.items():
        comp = DimensionCompressor.from_checkpoint(path).to(device).eval()
        top = vecs[:, :d]
        trained = next_token_damage(lm_head, hidden, targets, comp)
        pca = next_token_damage(lm_head, hidden, targets, lambda x: (x @ top) @ top.T)
        out[d] = {"downstream_kl": trained["kl"], "ce_increase": trained["ce_increase"],
                  "pca_downstream_kl": pca["kl"], "pca_ce_increase": pca["ce_increase"]}
    return out


def add_downstream(rows: list[dict[str, Any]], cfg: Any, manifest: dict[str, Any]) -> None:
    """Fill the downstream columns of the exported rows (last-layer sweeps only)."""
    import ray

    if manifest["layer"] != -1 or cfg.downstream_tokens <= 0:
        return
    checkpoints = {r["d_compressed"]: r["checkpoint"] for r in rows if "checkpoint" in r}
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    task = ray.remote(num_gpus=gpus, num_cpus=1)(measure)
    found = ray.get(task.remote(cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed, cfg.downstream_tokens, checkpoints))
    for r in rows:
        r.update(found.get(r["d_compressed"], {}))
