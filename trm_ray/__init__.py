"""trm_ray: the phase-1 dimension compressors of the LLM-TRM pipeline, trained and swept on Ray.

Set here because Ray reads it once, when first imported, and every trm_ray entry point imports
trm_ray first: the one line of Ray's own that a trm_ray driver drops from the worker logs Ray
forwards to it. On a cluster, Ray Train starts a restartable preemption watcher for each trial
with the handles of the trial's workers, and Ray logs, from every trial, its alarm for restartable
actors whose arguments hold object references (`E ... core_worker.cc ... 'PreemptionWatcher' ...
has constructor arguments in the object store and max_restarts > 0`). The watcher is what lets
Train wait out a spot GPU node's preemption, so it stays; the handles it is built with live as
long as the trial's controller, which holds them too. A local Ray runs without it (trm_ray.cli).
"""

import os

os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX",
                      r"class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in the object store")
