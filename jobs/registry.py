"""Job kinds: plain functions registered by name, with the few facts the queue needs about them.

The queue never knows what a kind does (quantize, evaluate...). A module registers its kinds with
`@job_kind("name")` at import time; the worker imports those modules (`--modules`) and so does the
process that submits jobs, so both sides see the same registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from jobs.context import JobContext

__all__ = ["JobKind", "job_kind", "get_kind", "known_kinds", "is_requeue_safe", "import_kind_modules"]

JobFn = Callable[["JobContext", dict], "dict | None"]
ValidateFn = Callable[[dict, "Engine"], dict]


@dataclass(frozen=True)
class JobKind:
    """A registered kind: the function to run and how the queue must treat it."""

    name: str
    fn: JobFn
    needs_gpu: bool = False
    # Safe to run again from scratch after a crash (no partial side effects outside work_dir).
    requeue_safe: bool = False
    validate: ValidateFn | None = None


_KINDS: dict[str, JobKind] = {}


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    # A module re-imported (importlib.reload, a test re-running registration) re-registers the
    # "same" function as a new object; only a different function under one name is a mistake.
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def job_kind(
    name: str,
    *,
    needs_gpu: bool = False,
    requeue_safe: bool = False,
    validate: ValidateFn | None = None,
) -> Callable[[JobFn], JobFn]:
    """Register `fn(ctx, params) -> dict | None` as the job kind `name`; returns `fn` unchanged.

    `validate(params, engine)` runs in the submitting process and returns the normalized params,
    or raises `ValueError` with a message the user can act on (then nothing is queued).
    """
    if not name or not name.strip():
        raise ValueError("a job kind needs a non-empty name")

    def register(fn: JobFn) -> JobFn:
        old = _KINDS.get(name)
        if old is not None and not _same_function(old.fn, fn):
            raise ValueError(
                f"job kind {name!r} is already registered by {old.fn.__module__}.{old.fn.__qualname__}; "
                f"pick another name for {fn.__module__}.{fn.__qualname__}"
            )
        _KINDS[name] = JobKind(name, fn, needs_gpu=needs_gpu, requeue_safe=requeue_safe, validate=validate)
        return fn

    return register


def known_kinds() -> list[str]:
    """Names of all registered kinds, sorted."""
    return sorted(_KINDS)


def get_kind(name: str) -> JobKind:
    """The registered kind `name`; `ValueError` listing the known kinds if there is none."""
    kind = _KINDS.get(name)
    if kind is None:
        known = ", ".join(known_kinds()) or "none (no module registering job kinds was imported)"
        raise ValueError(f"unknown job kind {name!r}; known kinds: {known}")
    return kind


def is_requeue_safe(name: str) -> bool:
    """Whether a job of kind `name` may simply run again after a crash; False for unknown kinds
    (a process that does not know the kind must not guess: the user can still retry)."""
    kind = _KINDS.get(name)
    return kind is not None and kind.requeue_safe


def import_kind_modules(modules: Iterable[str]) -> None:
    """Import the modules that register job kinds (e.g. `workbench.job_kinds`)."""
    for module in modules:
        module = module.strip()
        if not module:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(
                f"cannot import job-kind module {module!r}: {exc}. Check the --modules list and that "
                "the project root is on PYTHONPATH."
            ) from exc
