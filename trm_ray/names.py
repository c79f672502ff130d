"""The names the outside world sees, in one place: the metric names that reports, checkpoints, result rows
and ASHA share, the files a sweep writes, and what a width's report and the ASHA record are called. Those
that depend on the settings (trial and W&B run names, the result and export paths) are Config's methods.
Tune restores a sweep by its trial names, and W&B resumes a run by its name: none may drift between modules."""

from __future__ import annotations

import posixpath

# --- metrics ------------------------------------------------------------------------------
# What a checkpoint records of its compressor: validation reconstruction metrics, and how far W's rows are from orthonormal.
METRICS = ("mse", "cosine_similarity", "relative_error", "variance_ratio", "explained_variance",
           "centred_explained_variance", "centred_cosine_similarity", "orthonormality_error")
# Those the spectrum holds for the PCA reconstruction of every D' (`pca_<metric>`).
PCA_METRICS = METRICS[:-1]
# The PCA limit's values a row carries beside the trained compressor's: uncentred and centred.
PCA_REFERENCES = ("cosine_similarity", "explained_variance", "centred_cosine_similarity", "centred_explained_variance")
KL_METRICS = ("downstream_kl", "pca_downstream_kl", "downstream_efficiency")  # kept with the best weights of a KL objective
# What each epoch's report carries that ASHA can rank on (anything else would never arrive, and ASHA
# would silently stop nothing).
KL_ONLY_METRICS = ("downstream_efficiency", "downstream_kl")  # measured only when the loss reads the LM head
# What each epoch's validation reports for --objective phase2 (trm_ray.phase2), and the checkpoint keeps with its best weights.
PHASE2_METRICS = ("context_mse", "context_cosine_similarity", "context_pca_mse", "context_pca_efficiency", "close_downstream_kl",
           "close_top1_agreement", "close_pca_downstream_kl", "phase2_score")
ASHA_METRICS = ("pca_efficiency", *PCA_METRICS, "train_loss", *KL_ONLY_METRICS, "phase2_score")
LOWER_IS_BETTER = ("mse", "relative_error", "train_loss", "downstream_kl", "phase2_score")

# --- files --------------------------------------------------------------------------------
CHECKPOINT_FILE = "compressor.pt"  # the best compressor so far, in the seed's checkpoint format
RESUME_FILE = "resume.pt"  # model, optimizer, epoch, early-stopping state, tokens seen


def spectrum_files(shards_dir: str, val_fraction: float, seed: int, name: str = "spectrum") -> tuple[str, str]:
    """<name>-val<fraction>-seed<seed>.json and .pt: one pair per split, so a spectrum computed for one
    split never stands in for another's (the PCA init and the PCA downstream KL read the .pt)."""
    stem = posixpath.join(shards_dir, f"{name}-val{val_fraction:g}-seed{seed}")
    return f"{stem}.json", f"{stem}.pt"


def width_key(d: int, metric: str) -> str:
    """A D''s metric in a trial's report: d256/mse (Tune and ASHA read it under this name)."""
    return f"d{d}/{metric}"


def cuts_name(group: str) -> str:
    """The named `WidthCuts` actor of the sweep whose W&B group (unique per sweep) is `group`."""
    return f"trm_ray-asha-cuts-{group}"
