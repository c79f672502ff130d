"""The passes over the shards that read the LM head (`trm_ray.kl` holds their math), as Ray tasks (on GPUs with
--use_gpu): the exported compressors' and PCA's next-token KL, CE increase and top-1 agreement over the whole
validation set, the one trials are selected on (`measure`, filling the result rows), and the PCA
reconstruction's KL every epoch is measured against (`pca_kl`), and `--init fisher`'s start (`fisher_start`),
each split over every device of the cluster and summed; phase 2's references and start, a task a D'
(`references_and_start`).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator

import torch

from trm_ray.cluster import add_up, on_every_device
from trm_ray.compressor import WEIGHT_KEY, DimensionCompressor, load_checkpoint
from trm_ray.config import UserError
from trm_ray.files import read_json, write_bytes
from trm_ray.hidden import decode_hidden, next_tokens
from trm_ray.kl import damage_metrics, damage_sums, fisher_sum, grid_kl
from trm_ray.model import check_lm_head, load_lm_head
from trm_ray.names import spectrum_files
from trm_ray.pca import moment_matrix
from trm_ray.phase2 import REGIONS, phase2_score, refine_start, region_codes
from trm_ray.references import eigenvectors, store_fisher_start
from trm_ray.shards import read_manifest, split_counts, split_tables
from trm_ray.spectrum import load_or_compute


def measure(use_gpu: bool, model_name: str, shards_dir: str, val_fraction: float, seed: int,
            checkpoints: dict[int, str | None]) -> dict[int, dict[str, float]]:
    """For each D': KL, CE increase and top-1 agreement of the exported compressor and of the PCA
    reconstruction over the whole validation set, the set trials were selected on, from `measure_sums` split
    over every device of the cluster (`on_every_device`). A D' without a checkpoint path is the closed form,
    whose weights are the PCA reconstruction's own float32 eigenvectors: it is scored once, as PCA."""
    parts = on_every_device(use_gpu, len(read_manifest(shards_dir)["shards"]), measure_sums, model_name, shards_dir,
                            val_fraction, seed, checkpoints)
    sums, tokens, known = add_up(parts)
    out = {}
    for d, path in checkpoints.items():
        trained, pca = (damage_metrics(sums[kind, d], tokens, known) for kind in ("trained" if path else "pca", "pca"))
        out[d] = {"downstream_kl": trained["kl"], "ce_increase": trained["ce_increase"],
                  "top1_agreement": trained["top1_agreement"],
                  "pca_downstream_kl": pca["kl"], "pca_ce_increase": pca["ce_increase"],
                  "pca_top1_agreement": pca["top1_agreement"], "downstream_efficiency": pca["kl"] / trained["kl"]}
    return out


def measure_sums(model_name: str, shards_dir: str, val_fraction: float, seed: int, checkpoints: dict[int, str | None],
                 part: tuple[int, int] = (0, 1)) -> tuple[dict[tuple[str, int], torch.Tensor], int, int]:
    """`damage_sums` of each ("trained" or "pca", D') over the validation rows of `part` of the shards (one
    shard's rows at a time, chunked; the original's logits serve every reconstruction), with the rows and the
    rows with a known next token."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Logits in float32 on GPU too: bf16 logits put a noise floor under the small KLs of a wide D'.
    lm_head = load_lm_head(model_name, device, torch.float32)
    vecs = eigenvectors(shards_dir, val_fraction, seed).float().to(device)
    reconstructions: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {}
    for d, path in checkpoints.items():
        reconstructions["pca", d] = lambda x, top=vecs[:, :d]: (x @ top) @ top.T
        if path:
            reconstructions["trained", d] = DimensionCompressor.from_checkpoint(path).to(device).eval()
    sums = {k: torch.zeros(3, dtype=torch.float64) for k in reconstructions}
    tokens = known = 0
    for table in split_tables(shards_dir, val_fraction, seed, part=part):
        targets = next_tokens(table)
        found = damage_sums(lm_head, decode_hidden(table["hidden"]), targets, reconstructions)
        sums = {k: sums[k] + found[k] for k in sums}
        tokens, known = tokens + len(targets), known + int((targets >= 0).sum())
    return sums, tokens, known


def pca_kl(use_gpu: bool, model_name: str, shards_dir: str, val_fraction: float, seed: int,
           d_values: list[int]) -> dict[str, float]:
    """Mean next-token KL of the PCA reconstruction of each D' over the whole validation set: the reference a
    KL-trained trial's `downstream_efficiency` is measured against, every epoch; `pca_kl_sums` split over every
    device of the cluster (`on_every_device`)."""
    parts = on_every_device(use_gpu, len(read_manifest(shards_dir)["shards"]), pca_kl_sums, model_name, shards_dir,
                            val_fraction, seed, d_values)
    sums, n = add_up(parts)
    return {str(d): s / max(n, 1) for d, s in zip(d_values, sums.tolist())}


@torch.no_grad()
def pca_kl_sums(model_name: str, shards_dir: str, val_fraction: float, seed: int, d_values: list[int],
                part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, int]:
    """Σ next-token KL of the PCA reconstruction of each D' over the validation rows of `part` of the shards,
    and how many rows (one teacher pass for every D', `grid_kl`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm_head = load_lm_head(model_name, device, torch.float32)  # as `measure` and the trials' validation score
    vecs = eigenvectors(shards_dir, val_fraction, seed).float().to(device)
    sums, n = torch.zeros(len(d_values), dtype=torch.float64, device=device), 0
    for table in split_tables(shards_dir, val_fraction, seed, part=part):
        x = decode_hidden(table["hidden"]).to(device)
        sums += grid_kl(lm_head, x, [vecs[:, :d].T for d in d_values]).double()
        n += x.shape[0]
    return sums.cpu(), n


FISHER_TOKENS = 2 ** 16  # training rows the head's mean Fisher information (a D x D average) is estimated on
FISHER_PART_TOKENS = 2 ** 12  # the fewest of those rows worth a task of their own (each loads the head)


def fisher_start(use_gpu: bool, model_name: str, shards_dir: str, val_fraction: float, seed: int) -> None:
    """Store `--init fisher`'s start beside the spectrum: `fisher_basis` of the head's mean Fisher
    information F (on the first FISHER_TOKENS training rows, `fisher_sums` split over every device of the
    cluster) and the spectrum's Σ, with the quadratic KL of it and of PCA at every D' (`start_basis` starts
    from the better of the two).

    Where PCA keeps the directions of most energy, this keeps those that move the logits most. But
    after the QR it is the orthogonal projection onto the Fisher optimum's subspace, not the optimum
    itself, and PCA's subspace can score better."""
    rows = min(FISHER_TOKENS, split_counts(read_manifest(shards_dir), val_fraction, seed)["train_tokens"])
    parts = on_every_device(use_gpu, max(1, rows // FISHER_PART_TOKENS), fisher_sums, model_name, shards_dir,
                            val_fraction, seed, rows)
    fisher, n = add_up(parts)
    summary = read_json(spectrum_files(shards_dir, val_fraction, seed)[0])
    vecs = eigenvectors(shards_dir, val_fraction, seed)
    store_fisher_start(shards_dir, val_fraction, seed, fisher / n, moment_matrix(summary, vecs), vecs, n)


def fisher_sums(model_name: str, shards_dir: str, val_fraction: float, seed: int, rows: int,
                part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, int]:
    """`fisher_sum` over `part` of the first `rows` training rows (the i-th of n contiguous ranges, so that the n
    tasks together read exactly the rows one would): only that range's rows are decoded."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm_head = load_lm_head(model_name, device, torch.float32)
    lo, hi = part[0] * rows // part[1], (part[0] + 1) * rows // part[1]

    def own_rows() -> Iterator[torch.Tensor]:
        start = 0  # of the table, among the training rows
        for table in split_tables(shards_dir, val_fraction, seed, val_side=False):
            if start + table.num_rows > lo:
                own = table["hidden"].slice(max(lo - start, 0), hi - max(lo, start))
                yield decode_hidden(own).to(device)
            start += table.num_rows
            if start >= hi:
                return

    return fisher_sum(lm_head, own_rows())

def check_head(cfg: Any) -> None:
    """At a sweep's start, before anything runs: the LM head it will read (a KL objective's, or the downstream
    pass's of a last-layer sweep) gives the model's own logits (`check_lm_head`; else a one-line refusal).
    A model without one (a sentence encoder) cannot train on the KL; for an mse sweep it is said here, once,
    and the downstream pass is skipped: its rows are complete without a KL that never existed."""
    if (cfg.objective == "mse" and (cfg.layer != -1 or not cfg.downstream)) or check_lm_head(cfg.model_name):
        return
    if cfg.objective != "mse":
        raise UserError(f"{cfg.model_name} has no LM head (its weight files hold none): --objective {cfg.objective} "
                        "trains on the head's next-token KL; use --objective mse")
    print(f"sweep: {cfg.model_name} has no LM head (its weight files hold none): there is no next-token KL to score "
          "against, so the downstream pass is skipped", flush=True)


def add_downstream(rows: list[dict[str, Any]], cfg: Any, manifest: dict[str, Any]) -> None:
    """Fill the downstream columns of the exported rows (last-layer sweeps of a model with an LM head only)."""
    if manifest["layer"] != -1 or not cfg.downstream or not check_lm_head(cfg.model_name):
        return
    checkpoints = {r["d_compressed"]: None if r["obtained_by"] == "closed_form" else r["checkpoint"]
                   for r in rows if "checkpoint" in r}
    found = measure(cfg.use_gpu, cfg.model_name, cfg.shards_path, cfg.val_fraction, cfg.seed, checkpoints)
    for r in rows:
        r.update(found.get(r["d_compressed"], {}))


MIX_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # λ of the mixed second moments phase 2's start is chosen from
START_TOKENS = 2 ** 16  # training closing states (at most) the start is chosen on


def _close_rows(shards_dir: str, val_fraction: float, seed: int, val_side: bool, code: int, limit: int | None) -> torch.Tensor:
    rows, n = [], 0
    for table in split_tables(shards_dir, val_fraction, seed, val_side=val_side):
        rows.append(decode_hidden(table["hidden"].filter(table["region"].to_numpy() == code)))  # only those decoded
        n += len(rows[-1])
        if limit is not None and n >= limit:
            break
    return torch.cat(rows)[:limit]


def references_and_start(use_gpu: bool, model_name: str, shards_dir: str, val_fraction: float, seed: int,
                         d_values: list[int], stage1a: dict[int, str], start_path: str,
                         close_weight: float) -> dict[str, dict[str, float]]:
    """The references each epoch is scored against (`context_pca_mse`, `close_pca_downstream_kl` per D', on the
    validation rows), and the start of each D', written to `start_path` (the sweep's own: it depends on its
    stage 1a weights): `references_and_starts` of each D' on its own device (a D' is refined alone), at once."""
    for region in REGIONS:  # computed here once, not by every task at the same time
        load_or_compute(shards_dir, val_fraction, seed, region=region)
    parts = on_every_device(use_gpu, len(d_values), references_and_starts, model_name, shards_dir, val_fraction, seed,
                            d_values, stage1a, close_weight)
    starts, references = add_up(parts)  # each D' is one task's: the union of theirs
    buf = io.BytesIO()
    torch.save({d: starts[d] for d in d_values}, buf)
    write_bytes(start_path, buf.getvalue())
    return {k: {str(d): references[k][str(d)] for d in d_values} for k in references}


@torch.no_grad()
def references_and_starts(model_name: str, shards_dir: str, val_fraction: float, seed: int, d_values: list[int],
                          stage1a: dict[int, str], close_weight: float, part: tuple[int, int] = (0, 1),
                          ) -> tuple[dict[int, torch.Tensor], dict[str, dict[str, float]]]:
    """For every n-th D' from the i-th (`part`): its references and its start, the best on the training rows, by
    `phase2_score`, of the stage 1a weights (`stage1a`: D' -> checkpoint) and the mixed second moments' top-D'
    eigenvectors for every λ of MIX_GRID, then moved down the loss with the context in closed form
    (`phase2.refine_start`) where that scores better still."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm_head = load_lm_head(model_name, device, torch.float32)
    code = region_codes(read_manifest(shards_dir))["close"]
    summary = {r: load_or_compute(shards_dir, val_fraction, seed, region=r) for r in REGIONS}
    vecs = {r: eigenvectors(shards_dir, val_fraction, seed, f"spectrum-{r}") for r in REGIONS}
    sigma = {r: moment_matrix(summary[r], vecs[r]) for r in REGIONS}
    mixed = {lam: torch.linalg.eigh(sigma["context"] / sigma["context"].trace() + lam * sigma["close"] / sigma["close"].trace())[1].flip(1)
             for lam in MIX_GRID}
    d_values = d_values[part[0]::part[1]]
    close_pca = {d: vecs["close"][:, :d].T.float().to(device) for d in d_values}
    val_close = _close_rows(shards_dir, val_fraction, seed, True, code, None).to(device)
    train_close = _close_rows(shards_dir, val_fraction, seed, False, code, START_TOKENS).to(device)
    val_kl = grid_kl(lm_head, val_close, list(close_pca.values())).cpu() / max(len(val_close), 1)
    train_ref = grid_kl(lm_head, train_close, list(close_pca.values())).cpu() / len(train_close)
    context_total = float(sigma["context"].trace())
    starts = {}
    for i, d in enumerate(d_values):
        candidates = {f"mix{lam:g}": mixed[lam][:, :d].T for lam in MIX_GRID}
        candidates["stage1a"] = load_checkpoint(stage1a[d], d_model=sigma["context"].shape[0], d_compressed=d)["compressor"][WEIGHT_KEY].double()
        limit = context_total - sum(summary["context"]["eigenvalues"][:d])
        def scores_of(candidates: dict[str, torch.Tensor]) -> dict[str, float]:
            kl = grid_kl(lm_head, train_close, [w.float().to(device) for w in candidates.values()]).cpu() / len(train_close)
            scores = {}
            for (name, w), k in zip(candidates.items(), kl.tolist()):
                w = w.double().cpu()
                residual = context_total - float((w @ sigma["context"] @ w.T).trace())  # for orthonormal rows
                scores[name] = phase2_score(k, float(train_ref[i]), limit / max(residual, 1e-30))
            return scores

        scores = scores_of(candidates)
        best = min(scores, key=scores.get)
        candidates["refined"] = refine_start(candidates[best], sigma["context"], limit, train_close, lm_head,
                                             float(train_ref[i]), close_weight)
        scores |= scores_of({"refined": candidates["refined"]})
        chosen = "refined" if scores["refined"] < scores[best] else best
        starts[d] = candidates[chosen].float().cpu().contiguous()
        print(f"phase2: D'={d} starts from {chosen} (training phase2_score {scores[chosen]:.4g}; the best closed form, "
              f"{best}, {scores[best]:.4g}; stage 1a's {scores['stage1a']:.4g})", flush=True)
    return starts, {"context_pca_mse": {str(d): summary["context"]["pca_mse"][d] for d in d_values},
                    "close_pca_downstream_kl": {str(d): k for d, k in zip(d_values, val_kl.tolist())}}
