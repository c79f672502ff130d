"""ASHA that is fair across D': a width competes only with the same width at other learning rates.

A smaller D' always reconstructs worse, so ASHA over a whole D' grid stops the small
widths first and destroys the very curve a D' sweep exists to draw. A trial trains every D'
of the grid at one learning rate (one read of each batch serves them all), and reports each
width's metrics under its own name (`d256/pca_efficiency`); here each D' gets its own ASHA,
in which the trials' learning rates compete on that width's metric. A width ASHA stops in a
trial is written to `WidthCuts`, which the trial reads after each report, once ASHA has
decided on it, and stops training that width (Tune can stop a trial, not one width of it); the trial ends by itself when all its
widths have stopped, its checkpoints and W&B runs closed (a trial Tune stopped would be killed
mid-write). A D' with a single learning rate is never stopped. Rungs are on `tokens_seen`, a
monotone counter that survives a restore, so decisions stay valid when a sweep is resumed.
Tune does not save a scheduler's state: the rungs (each trial's score at each milestone) and
the cuts are written to `rungs_path` at every decision and read back when a resumed sweep
rebuilds a width's ASHA, so a trial that resumes past a milestone is measured against the
scores recorded there before the interruption.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from trm_ray.files import read_json, write_json
from trm_ray.names import cuts_name, width_key
from trm_ray.spec import config_of


class WidthCuts:
    """A Ray actor: the widths ASHA stopped in each trial (trial label -> D' values), and how far
    (tokens_seen) the scheduler has read each trial's reports."""

    def __init__(self, cut: dict[str, list[int]]):
        self.cut, self.read = cut, {}

    def add(self, trial: str, d: int) -> None:
        self.cut.setdefault(trial, []).append(d)

    def decided(self, trial: str, tokens_seen: int) -> None:
        self.read[trial] = max(self.read.get(trial, 0), tokens_seen)

    def of(self, trial: str, tokens_seen: int) -> list[int] | None:
        """The trial's widths ASHA stopped, once it has decided on the report at `tokens_seen` (None before)."""
        return self.cut.get(trial, []) if self.read.get(trial, 0) >= tokens_seen else None


class PerWidthASHA(FIFOScheduler):
    def __init__(self, rungs_path: str, group: str, metric: str, **asha: Any):
        super().__init__()
        self.rungs_path, self.group, self.width_metric = rungs_path, group, metric
        self.asha = {**asha, "metric": metric}
        self.by_width: dict[int, ASHAScheduler] = {}
        self.read_decisions()

    def read_decisions(self) -> None:
        """The widths stopped so far, as saved (a resumed sweep unpickles the scheduler Tune saved at its start)."""
        saved = read_json(self.rungs_path) or {}
        self.cut: dict[str, list[int]] = saved.get("cut", {})  # trial label -> widths ASHA stopped
        self._cuts = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cuts": None}  # an actor handle belongs to the driver that started it

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.read_decisions()

    def cuts(self) -> Any:
        """The `WidthCuts` actor the trials read, started on first use with the cuts recorded so far."""
        import ray

        if self._cuts is None:
            self._cuts = ray.remote(WidthCuts).options(name=cuts_name(self.group), num_cpus=0,
                                                       get_if_exists=True).remote(self.cut)
        return self._cuts

    def _for(self, d: int) -> ASHAScheduler:
        if d not in self.by_width:
            self.by_width[d] = ASHAScheduler(**self.asha)
            for recorded, saved in zip(self.rungs(d), (read_json(self.rungs_path) or {}).get(str(d), [])):
                recorded.update(saved)
        return self.by_width[d]

    def rungs(self, d: int) -> list[dict[str, float]]:
        """Width d's rungs, highest milestone first: trial id -> score there (ASHA's one bracket; Ray has no API)."""
        return [recorded for _, recorded in self.by_width[d]._brackets[0]._rungs]

    def save(self) -> None:
        write_json(self.rungs_path, {**{str(d): self.rungs(d) for d in self.by_width}, "cut": self.cut})

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    @staticmethod
    def widths(trial: Any) -> list[int]:
        return config_of(trial.config).d_values

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.cuts()
        for d in self.widths(trial):
            self._for(d).on_trial_add(tune_controller, trial)

    def width_result(self, result: dict[str, Any], d: int) -> dict[str, Any]:
        """The trial's report as width d's ASHA reads it: that width's metric under ASHA's metric name
        (absent when the width did not train this epoch, which ASHA then ignores)."""
        key = width_key(d, self.width_metric)
        return {**result, self.width_metric: result[key]} if key in result else {}

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        label = config_of(trial.config).trial_label
        cut = self.cut.setdefault(label, [])
        for d in self.widths(trial):
            if d not in cut and self._for(d).on_trial_result(tune_controller, trial,
                                                            self.width_result(result, d)) == TrialScheduler.STOP:
                cut.append(d)
                self.cuts().add.remote(label, d)
        self.cuts().decided.remote(label, result["tokens_seen"])  # after the adds: an actor runs one caller's calls in order
        self.save()
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        for d in self.widths(trial):
            self._for(d).on_trial_complete(tune_controller, trial, self.width_result(result, d))
        self.save()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        for d in self.widths(trial):
            self._for(d)._trial_info.pop(trial.trial_id, None)  # ASHA's own on_trial_remove fails on a width it already dropped

    def debug_string(self) -> str:
        return "; ".join(f"d{d}: {s.debug_string()}" for d, s in sorted(self.by_width.items()))
