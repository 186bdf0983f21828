"""Fault-injection hook for worker processes: hold a job at a chosen stage until it is killed.

A worker started with `--modules workbench.job_kinds,tests.reliability.stage_hold` and
FLEXQUANT_TEST_HOLD="<stage>#<n>" runs jobs normally until the n-th progress update of `<stage>`
(after that update reached the Job row), then blocks there, so a test can SIGKILL the worker at a
known point of the real job instead of racing a stage that lasts milliseconds. Without the variable
nothing changes.

It also imports the heavy libraries (torch, transformers, llmcompressor) in the worker, so its forked
job processes start with them loaded: an attempt then costs seconds instead of a fresh import.
"""

from __future__ import annotations

import logging
import os
import time

import torch  # noqa: F401 - preloaded for the forked job processes (see the module docstring)
import transformers  # noqa: F401
from llmcompressor import oneshot  # noqa: F401

from jobs.context import JobContext

log = logging.getLogger(__name__)

HOLD_ENV = "FLEXQUANT_TEST_HOLD"
_original_on_update = JobContext.on_update
_seen: dict[str, int] = {}


def _hold_spec() -> tuple[str, int] | None:
    spec = os.environ.get(HOLD_ENV, "")
    if not spec:
        return None
    stage, _, count = spec.partition("#")
    return stage, int(count or 1)


def _on_update_then_hold(self: JobContext, stage: str, percent: float, message: str, eta_s) -> None:  # noqa: ANN001
    _original_on_update(self, stage, percent, message, eta_s)
    spec = _hold_spec()
    if spec is None or stage != spec[0]:
        return
    _seen[stage] = _seen.get(stage, 0) + 1
    if _seen[stage] != spec[1]:
        return
    log.warning("job %s held at stage %r (update %d) for a fault test", self.job_id, stage, spec[1])
    self.buffer_line(f"[fault-test] held at stage {stage!r} (update {spec[1]})")
    self.flush(force=True)  # the row shows this stage and line before we stop moving
    while True:  # until the test kills the worker (PDEATHSIG takes this process down with it)
        time.sleep(0.5)


JobContext.on_update = _on_update_then_hold
