"""The job queue as an HTML table for the Models & Jobs tab: a progress bar, stage, ETA, elapsed
time and log tail per job. Everything user-typed is escaped: a job title is text, never markup."""

from __future__ import annotations

import html
import time

import pandas as pd

__all__ = ["STATUS_COLORS", "render_jobs_html"]

STATUS_COLORS = {
    "queued": "#7f7f7f",
    "running": "#1f77b4",
    "done": "#2ca02c",
    "failed": "#d62728",
    "cancelled": "#8c564b",
    "interrupted": "#ff7f0e",
}


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or pd.isna(seconds):
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render_jobs_html(jobs: pd.DataFrame, *, log_lines: int = 4, now: float | None = None) -> str:
    """The queue as an HTML table: a progress bar per job, stage, ETA, elapsed time and the last
    `log_lines` lines of its log (the error instead, for a failed job)."""
    if jobs.empty:
        return "<p class='fq-empty'>No jobs yet. Submit one above.</p>"
    now = time.time() if now is None else now
    out = [
        "<table class='fq-jobs'><thead><tr><th>#</th><th>job</th><th>status</th><th>progress</th>"
        "<th>stage</th><th>ETA</th><th>elapsed</th><th>log</th></tr></thead><tbody>"
    ]
    for job in jobs.itertuples():
        status = str(job.status)
        percent = 100.0 if status == "done" else float(job.percent or 0.0)
        color = STATUS_COLORS.get(status, "#7f7f7f")
        end = job.finished_at if job.finished_at and not pd.isna(job.finished_at) else now
        elapsed = end - job.started_at if job.started_at and not pd.isna(job.started_at) else None
        text = job.error if status == "failed" and job.error else (job.log_tail or "")
        tail = "\n".join(str(text).rstrip().splitlines()[-log_lines:])
        title = job.title or job.kind
        eta = _fmt_duration(job.eta_s) if status == "running" else ""
        out.append(
            f"<tr data-job-id='{int(job.id)}' data-status='{html.escape(status)}'>"
            f"<td>{int(job.id)}</td><td>{html.escape(str(title))}<br><small>{html.escape(str(job.kind))}"
            f"{' · attempt ' + str(job.attempts) if job.attempts and job.attempts > 1 else ''}</small></td>"
            f"<td><span class='fq-status' style='color:{color}'>{html.escape(status)}</span></td>"
            f"<td><div class='fq-bar' title='{percent:.0f}%'>"
            f"<div style='width:{percent:.1f}%;background:{color}'></div></div>"
            f"<small>{percent:.0f}%</small></td>"
            f"<td>{html.escape(str(job.stage or ''))}"
            f"<br><small>{html.escape(str(job.message or ''))}</small></td>"
            f"<td>{eta}</td><td>{_fmt_duration(elapsed)}</td>"
            f"<td><pre class='fq-log'>{html.escape(tail)}</pre></td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)
