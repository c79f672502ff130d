"""Weights & Biases for one trial, or a stand-in that does nothing, so the loop never branches on logging.

Only rank 0 of a trial logs: one W&B run per trial, grouped per sweep, with the trial's
config, its per-epoch metrics and, at the end, its best checkpoint as a model artifact.
`WANDB_MODE=offline` works without an account or key.
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

        self.name = name
        self.run = wandb.init(project=project, group=group, name=name, id=f"{group}-{name}", resume="allow",
                              config=config, dir=directory, reinit="create_new",
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


def prepare_wandb(cfg: Config) -> None:
    """With W&B on but no key anywhere, log offline (sync later) rather than fail inside a worker.

    Must run before Ray starts: workers inherit WANDB_MODE from the driver."""
    if not cfg.use_wandb or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    os.environ["WANDB_MODE"] = "offline"
    print(f"W&B: no API key found (wandb login / WANDB_API_KEY); logging offline under {cfg.output_dir}/wandb, "
          "upload later with `wandb sync`", flush=True)
