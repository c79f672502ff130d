"""What every entry point shares: joining or starting Ray, and one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import sys
from typing import Callable

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
        return
    env = forwarded_env(os.environ)
    if cfg.address:
        ray.init(address=cfg.address, runtime_env={"env_vars": env} if env else None)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env} if env else None)


SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    """The driver's settings that workers need (W&B mode, HF offline flags, Ray Train/Data knobs).

    Never a secret: a job's runtime environment is stored by Ray and shown in its dashboard.
    Keys stay in each node's own environment (a local Ray inherits the driver's)."""
    return {k: v for k, v in environ.items()
            if k.startswith(("WANDB_", "HF_", "TRANSFORMERS_", "RAY_DATA_", "RAY_TRAIN_"))
            and not any(word in k for word in SECRET_WORDS)}


def user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when Ray wrapped it on its way back from a worker."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(exc, UserError) and not isinstance(cause, UserError):
            return exc
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        sys.exit(2)
