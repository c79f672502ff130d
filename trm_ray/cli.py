"""What every entry point shares: one-line errors instead of tracebacks, also for errors Ray carried back from a worker."""

from __future__ import annotations

import sys
from typing import Callable

from trm_ray.config import UserError


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
