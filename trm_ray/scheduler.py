"""ASHA that is fair across D': trials compete only with trials of their own width.

A smaller D' always reconstructs worse, so ASHA over a whole D' grid stops the small
widths first and destroys the very curve a D' sweep exists to draw. Here each D' gets its
own ASHA: its learning rates (or seeds) compete on `pca_efficiency`, and a D' with a single
trial is never stopped. Rungs are on `tokens_seen`, a monotone counter that survives a
restore, so decisions stay valid when a sweep is resumed.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class PerWidthASHA(FIFOScheduler):
    def __init__(self, **asha: Any):
        super().__init__()
        self.asha = asha
        self.by_width: dict[int, ASHAScheduler] = {}

    def _for(self, trial: Any) -> ASHAScheduler:
        d = int(trial.config["d_compressed"])
        if d not in self.by_width:
            self.by_width[d] = ASHAScheduler(**self.asha)
        return self.by_width[d]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return self._for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self._for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"d{d}: {s.debug_string()}" for d, s in sorted(self.by_width.items()))
