"""Where numbers go besides Tune: Weights & Biases for one trial, and Ray's own metrics.

W&B, or a stand-in that does nothing, so the loop never branches on logging.

Only rank 0 of a trial logs: one W&B run per trial, grouped per sweep, with the trial's
config, its per-epoch metrics and, at the end, its best checkpoint as a model artifact.
`WANDB_MODE=offline` works without an account or key.

Ray metrics (`publish`) reach the dashboard's Metrics view and every node's Prometheus
endpoint while a sweep runs, without W&B: the live view of a cluster.
"""

from __future__ import annotations

import netrc
import os
from typing import Any

from trm_ray.config import Config


class NoTracking:
    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def log_checkpoint(self, path: str, metadata: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracking(NoTracking):
    def __init__(self, project: str, group: str, name: str, config: dict[str, Any], directory: str):
        import wandb

        mode = None  # as WANDB_MODE says
        if not offline() and not wandb_key_found():
            # The driver had a key, this node has none (keys are never shipped through Ray).
            print(f"W&B: no API key on this node; logging {name} offline under {directory}/wandb", flush=True)
            mode = "offline"
        self.name = name
        self.run = wandb.init(project=project, group=group, name=name, id=f"{group}-{name}", resume="allow",
                              config=config, dir=directory, reinit="create_new", mode=mode,
                              settings=wandb.Settings(quiet=True))

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def log_checkpoint(self, path: str, metadata: dict[str, Any]) -> None:
        import wandb

        artifact = wandb.Artifact(f"compressor-{self.name}", type="model", metadata=metadata)
        artifact.add_file(path)
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()


def tracking(enabled: bool, rank: int, **kwargs: Any) -> NoTracking:
    return WandbTracking(**kwargs) if enabled and rank == 0 else NoTracking()


def offline() -> bool:
    return os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun")


def wandb_key_found() -> bool:
    """A key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def prepare_wandb(cfg: Config) -> None:
    """With W&B on but no key anywhere, log offline (sync later) rather than fail inside a worker.

    Must run before Ray starts: workers inherit WANDB_MODE from the driver."""
    if not cfg.use_wandb or offline() or wandb_key_found():
        return
    os.environ["WANDB_MODE"] = "offline"
    print(f"W&B: no API key found (wandb login / WANDB_API_KEY); logging offline under {cfg.output_dir}/wandb, "
          "upload later with `wandb sync`", flush=True)


# Reported name -> Ray metric (Prometheus shows it with Ray's `ray_` prefix) and what it means.
RAY_METRICS = {
    "tokens_per_s": ("trm_train_tokens_per_s", "Training tokens per second of a trial's last epoch, all workers"),
    "validation_s": ("trm_validation_s", "Seconds a trial's last validation took (every rank scores its share)"),
    "cosine_similarity": ("trm_val_cosine_similarity", "Validation cosine similarity of a trial's last epoch"),
    "mse": ("trm_val_mse", "Validation reconstruction mse of a trial's last epoch"),
    "pca_efficiency": ("trm_pca_efficiency", "PCA-limit mse / validation mse of a trial's last epoch (1.0 = optimal)"),
    "epoch": ("trm_epoch", "Epochs a trial has finished"),
    "extract_tokens_per_s": ("trm_extract_tokens_per_s", "Hidden-state extraction tokens per second so far"),
    "extract_tokens": ("trm_extract_tokens", "Token rows extracted so far"),
}
_gauges: dict[str, Any] = {}


def publish(values: dict[str, Any], **tags: str) -> None:
    """Set the Ray gauges of the `values` trm_ray publishes, tagged e.g. with the trial's name."""
    from ray.util.metrics import Gauge

    for key, value in values.items():
        if key in RAY_METRICS and isinstance(value, (int, float)):
            if key not in _gauges:
                name, description = RAY_METRICS[key]
                _gauges[key] = Gauge(name, description, tag_keys=tuple(sorted(tags)))
            _gauges[key].set(float(value), tags=tags)
