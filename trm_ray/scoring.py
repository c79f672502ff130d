"""The passes over the exported compressors, after the export: the LM head's scores over the whole validation
set (`downstream.add_downstream`) and, for stage 1b, each region's (`regions.add_region_metrics`), each one Ray
task. The rows are saved before them (`report.save_rows`), and each pass fails alone (no output embeddings, out
of memory): it costs only its own columns, and its row column names it, not the other pass.
"""

from __future__ import annotations

from typing import Any

from trm_ray.config import Config
from trm_ray.downstream import add_downstream
from trm_ray.regions import add_region_metrics

# Each pass, with the column that says why it failed and what it is called.
PASSES = ((add_downstream, "downstream_error", "the downstream KL"), (add_region_metrics, "regions_error", "the per-region scores"))
FAILURES = ("error", *(column for _, column, _ in PASSES))  # a row with any of these: the sweep failed


def score(rows: list[dict[str, Any]], cfg: Config, manifest: dict[str, Any]) -> None:
    """Add every pass's columns to the exported rows, or to each row with a checkpoint the pass's failure."""
    for add, column, what in PASSES:
        try:
            add(rows, cfg, manifest)
        except Exception as e:  # anything at all: the trained results are already safe on disk
            cause = getattr(e, "cause", None) or e  # a Ray task's own exception, not Ray's wrapper
            failure = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
            print(f"sweep: {what} failed ({failure}); the results are saved without it", flush=True)
            for row in rows:
                if "checkpoint" in row:
                    row[column] = failure
