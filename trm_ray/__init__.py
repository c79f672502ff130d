"""trm_ray: the phase-1 dimension compressors of the LLM-TRM pipeline, trained and swept on Ray.

One line of Ray's own is dropped from the worker logs a trm_ray driver prints (set here: Ray
reads RAY_DEDUP_LOGS_SKIP_REGEX once, when first imported, and every entry point imports
trm_ray first). On a cluster, Ray Train starts a preemption watcher for each trial, restartable
and built with the handles of the trial's workers, and Ray logs from every trial its alarm for
such actors (`E ... core_worker.cc ... 'PreemptionWatcher' ... has constructor arguments in the
object store and max_restarts > 0`). The watcher lets Train wait out a spot GPU node's
preemption, so it stays; the handles it is built with are the trial controller's own, held as
long as the watcher runs, so the restart the alarm warns about cannot lose them. A local Ray
runs without the watcher (trm_ray.cluster.connect).
"""

import os

os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX",
                      r"class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in the object store")
