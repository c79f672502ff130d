"""Ray itself: joining or starting it, what a trial holds of it, and running one function as a task on it."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from trm_ray.config import Config, UserError


def connect(cfg: Config) -> None:
    """Join `cfg.address`, or start a local Ray with `cfg.num_cpus` logical CPUs."""
    # Ray Data's per-operator bars flood the log of a sweep; trm_ray prints its own progress.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Train V2's controller collects each epoch's report on its health-check poll (2 s by
    # default): on a short epoch that poll, not training, set the pace of the whole sweep.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray Train's state API in the dashboard: each run by name (d<D'>-lr<lr>), status, workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    import ray
    from ray.data import DataContext

    # Datasets carry the driver's context to Ray Data's own actors (split coordinators, readers),
    # whose bars would otherwise fill the log; the variable above is read only at first import.
    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        know_own_cluster()
        return
    if not cfg.address:
        # Train's preemption watcher (an actor per trial) follows the nodes an autoscaler drains for
        # preemption, and a local Ray has no autoscaler: off, it is one process less per trial.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    env = forwarded_env(os.environ)
    # Every worker process of the job (trials, Train's controllers and its placement-group cleaner
    # and state actor) learns its own cluster's address at start: with two local Rays on one machine,
    # Ray's State API calls would otherwise resolve "auto" to both and fail.
    runtime_env = {"env_vars": env, "worker_process_setup_hook": know_own_cluster}
    if cfg.address:
        start_ray(address=cfg.address, runtime_env=runtime_env)
    else:
        cpus = cfg.num_cpus or local_cpus(cfg)
        # The raylet warns ("N PYTHON worker processes have been started ... Nx the maximum expected
        # startup concurrency") past 4 worker processes for each one it may start at once, which Ray
        # caps at the cores. A trial keeps about six processes (Tune's function, Train's controller,
        # worker and helpers), two of them on logical CPUs, and a local Ray gets more logical CPUs
        # than cores for them (local_cpus): counted against those, the warning is left for a node
        # that runs more processes than its trials do.
        # address="local": a Ray of its own, never one that happens to run on this machine already (another
        # sweep's, or one a RAY_ADDRESS in the environment names), which ray.init() would join instead.
        start_ray(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                  runtime_env=runtime_env, _system_config={"worker_maximum_startup_concurrency": cpus})
    know_own_cluster()


def know_own_cluster() -> None:
    """RAY_ADDRESS := the cluster this process is connected to (run in the driver and, as the job's
    worker_process_setup_hook, in every worker): what Ray's State API reads instead of "auto".

    Every worker process of the job imports this module to run it, Ray's own helpers included (Train's
    controller, placement-group cleaner and synchronization actor, Data's stats actor): it imports no torch."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def start_ray(**kwargs: object) -> None:
    """`ray.init(**kwargs)`, with Ray's start-up failures (a timeout on a loaded machine, a cluster that is not
    there) as a one-line UserError that names the likely cause."""
    import ray

    try:
        ray.init(**kwargs)
    except (ValueError, TypeError):  # arguments Ray refused: a defect here, not the machine's
        raise
    except Exception as e:  # Ray's own start-up timeout is a bare Exception ("timed out during startup")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = (f"the Ray cluster at {kwargs['address']} did not answer: is it up (ray status)?"
                 if kwargs.get("address") not in (None, "local") else
                 "the local Ray did not start in time: the machine is probably loaded, or another Ray holds its ports; "
                 "try again, pass fewer --num_cpus, or join a running one with --address")
        raise UserError(f"{where} ({type(e).__name__}: {first})") from e


def trial_cpus(cfg: Config) -> int:
    """Logical CPUs one trial holds: its Tune function (1) and its Train workers (1 each on CPU)."""
    return int(trial_resources(cfg).get("CPU", 0))


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds while it runs: its Tune function (1 CPU) and what each Train worker asks for."""
    workers = scaling_config(cfg).total_resources
    return {**workers, "CPU": 1.0 + workers.get("CPU", 0)}


def local_cpus(cfg: Config) -> int:
    """Logical CPUs of a local Ray: the cores, or more when the trials the cores can run need more.

    Ray counts a trial's idle Tune function as a CPU: on 2 cores, 2 logical CPUs let two trials
    in whose workers then never start. So: as many concurrent trials as the cores can train,
    each with its Tune function and workers, plus one CPU for Ray Data's read tasks."""
    cores = os.cpu_count() or 1
    trials = max(1, len(cfg.sweep_learning_rates))  # a trial per learning rate, each training every D'
    concurrent = min(trials, cfg.max_concurrent_trials or trials, max(1, cores // cfg.num_workers))
    return max(cores, 1 + concurrent * trial_cpus(cfg))


SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
FORWARDED_PREFIXES = ("WANDB_", "HF_", "TRANSFORMERS_", "RAY_DATA_", "RAY_TRAIN_")


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    """The driver's settings that workers need (W&B mode, HF offline flags, Ray Train/Data knobs).

    Never a secret: a job's runtime environment is stored by Ray and shown in its dashboard.
    Keys stay in each node's own environment (a local Ray inherits the driver's)."""
    return {k: v for k, v in environ.items()
            if k.startswith(FORWARDED_PREFIXES) and not any(word in k.upper() for word in SECRET_WORDS)}


def scaling_config(cfg: Config) -> Any:
    """The trial's workers and what each asks for (also what the sweep counts to decide how many trials fit)."""
    import ray.train

    return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu)


def most_resources() -> dict[str, float] | None:
    """What the cluster's autoscaler may grow it to (each node type's resources x its max count, capped by the
    cluster's max), as Ray Train reads it before it waits for a worker group; None for a Ray without an autoscaler
    that reports its configuration (a local Ray, a fixed cluster)."""
    import ray._private.state

    try:
        return ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: an answer it cannot give is an autoscaler it cannot see
        return None


def cpu_tasks() -> int:
    """How many one-CPU tasks a pass over the shards runs at once: one per logical CPU of the Ray, but on a Ray of
    one node at most this machine's cores. A local Ray has more logical CPUs than cores (`local_cpus`), and a task
    more than the cores run only adds a process that imports torch (and loads the head) again."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    one_node = sum(node["Alive"] for node in ray.nodes()) == 1
    return min(cpus, os.cpu_count() or 1) if one_node else cpus


def on_every_device(use_gpu: bool, parts: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """`fn(*args, part=(i, n))` for i < n as n Ray tasks at once, one for each GPU the Ray has (with --use_gpu) or
    `cpu_tasks()` CPUs, at most `parts` (the pieces a pass can be split into): a pass over the shards that sums
    per row, spread over the cluster instead of one device. With --use_gpu a task requests a GPU, decided from the configuration (as
    extraction decides), so that a cluster with no GPU yet gets one task, for which its autoscaler adds a GPU node."""
    import ray

    devices = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else cpu_tasks()
    n = max(1, min(parts, devices))
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(fn)
    return ray.get([task.remote(*args, part=(i, n)) for i in range(n)])


def add_up(parts: list[Any]) -> Any:
    """The sum of `on_every_device`'s results: tensors and numbers added, tuples element by element, dicts key by key
    (a key only some parts have, e.g. a region with no rows in their shards, kept as they have it)."""
    def add(a: Any, b: Any) -> Any:
        if isinstance(a, dict):
            return {k: add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in a | b}
        if isinstance(a, tuple):
            return tuple(add(x, y) for x, y in zip(a, b))
        return a + b

    return functools.reduce(add, parts)
