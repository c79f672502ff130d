"""What the driver hands a trial, typed: its settings, the facts derived from the shards, and the references
each width is measured against. Tune stores a trial's config as the flat dict `TrialSpec.flat` gives (every
Config field beside the run's facts, references keyed by str(D')), and that dict is also what W&B and each
checkpoint record: its keys are the outside's, so a sweep interrupted before this type existed resumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trm_ray.config import FIELDS, Config, make_config

# The per-D' references a trial may carry: PCA's validation mse always, PCA's next-token KL for a KL objective,
# and phase 2's two (the context's PCA mse, the closing states' PCA KL) for --objective phase2.
REFERENCES = ("pca_mse", "pca_downstream_kl", "context_pca_mse", "close_pca_downstream_kl")


def config_of(flat: dict[str, Any]) -> Config:
    """The Config inside a flat dict that also holds other keys (a trial's config, a checkpoint's)."""
    return make_config({k: v for k, v in flat.items() if k in FIELDS})


@dataclass(frozen=True)
class TrialSpec:
    cfg: Config
    d_model: int  # the shards' hidden size D
    train_tokens: int = 0  # training rows of the split (all ranks): what sets the learning-rate schedule's length
    references: dict[str, dict[int, float]] = field(default_factory=dict)  # REFERENCES name -> D' -> value
    train_storage: str = ""  # where Ray Train keeps the trial's checkpoints
    group: str = ""  # the sweep's W&B group, unique per sweep: also the name of its ASHA record
    command: str = ""  # the command that started the sweep (each checkpoint carries it to its model card)

    def flat(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg), "d_model": self.d_model, "train_tokens": self.train_tokens,
                **{k: {str(d): v for d, v in self.references[k].items()} for k in REFERENCES if k in self.references},
                "train_storage": self.train_storage, "group": self.group, "command": self.command}

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> TrialSpec:
        return cls(config_of(flat), flat["d_model"], flat.get("train_tokens", 0),
                   {k: {int(d): v for d, v in flat[k].items()} for k in REFERENCES if k in flat},
                   flat.get("train_storage", ""), flat.get("group", ""), flat.get("command", ""))
