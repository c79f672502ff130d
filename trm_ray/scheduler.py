"""ASHA that is fair across D': trials compete only with trials of their own width.

A smaller D' always reconstructs worse, so ASHA over a whole D' grid stops the small
widths first and destroys the very curve a D' sweep exists to draw. Here each D' gets its
own ASHA: its learning rates (or seeds) compete on `pca_efficiency`, and a D' with a single
trial is never stopped. Rungs are on `tokens_seen`, a monotone counter that survives a
restore, so decisions stay valid when a sweep is resumed. Tune does not save a scheduler's
state: the rungs (each trial's score at each milestone) are written to `rungs_path` at every
decision and read back when a resumed sweep rebuilds a width's ASHA, so a trial that resumes
past a milestone is measured against the scores recorded there before the interruption.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from trm_ray.shards import read_json, write_json


class PerWidthASHA(FIFOScheduler):
    def __init__(self, rungs_path: str, **asha: Any):
        super().__init__()
        self.rungs_path = rungs_path
        self.asha = asha
        self.by_width: dict[int, ASHAScheduler] = {}

    def _for(self, trial: Any) -> ASHAScheduler:
        d = int(trial.config["d_compressed"])
        if d not in self.by_width:
            self.by_width[d] = ASHAScheduler(**self.asha)
            for recorded, saved in zip(self.rungs(d), (read_json(self.rungs_path) or {}).get(str(d), [])):
                recorded.update(saved)
        return self.by_width[d]

    def rungs(self, d: int) -> list[dict[str, float]]:
        """Width d's rungs, highest milestone first: trial id -> score there (ASHA's one bracket; Ray has no API)."""
        return [recorded for _, recorded in self.by_width[d]._brackets[0]._rungs]

    def save(self) -> None:
        write_json(self.rungs_path, {str(d): self.rungs(d) for d in self.by_width})

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision = self._for(trial).on_trial_result(tune_controller, trial, result)
        self.save()
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self._for(trial).on_trial_complete(tune_controller, trial, result)
        self.save()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"d{d}: {s.debug_string()}" for d, s in sorted(self.by_width.items()))
