"""The stock batch sweep as `autotune.tune_policy` reads it: rows in, checked measurements out.

`stock_sweep_rows` takes the stock targets' rows out of a bench results dict; `sweep_measurements`
turns rows (a list of dicts or a DataFrame) into {candidate: {batch: (prefill_s, tpot_ms)}}, drops
the BF16 rows (not a variant of the merged checkpoint) and raises a ValueError that names the row
and the fix for anything a tuning cannot rest on. A candidate is a (variant, int4 kernel or None)
pair; `candidate_name` spells it "variant@kernel".
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = [
    "SWEEP_COLUMNS",
    "Candidate",
    "candidate_name",
    "stock_sweep_rows",
    "sweep_measurements",
]

SWEEP_COLUMNS = ("variant", "kernel", "batch", "prefill_s", "tpot_ms")
NOT_IN_MERGED_CHECKPOINT = ("bf16",)

Candidate = tuple[str, str | None]  # (variant, int4 kernel or None)


def candidate_name(candidate: Candidate) -> str:
    variant, kernel = candidate
    return f"{variant}@{kernel}" if kernel else variant


def stock_sweep_rows(results: dict) -> list[dict]:
    """`tune_policy`'s input from a results dict: the stock targets' sweep rows with variant and kernel."""
    stock = {t["label"]: t for t in results.get("targets", []) if t.get("kind") == "stock"}
    return [
        {
            "variant": stock[row["target"]].get("variant"),
            "kernel": stock[row["target"]].get("kernel"),
            "batch": row.get("batch"),
            "prefill_s": row.get("prefill_s"),
            "tpot_ms": row.get("tpot_ms"),
        }
        for row in results.get("sweep", [])
        if row.get("target") in stock
    ]


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def sweep_measurements(
    sweep: list[dict] | pd.DataFrame, int4_kernels: tuple[str, ...]
) -> tuple[dict[Candidate, dict[int, tuple[float, float]]], list[int], list[str]]:
    """{candidate: {batch: (prefill_s, tpot_ms)}}, the batches, and the ignored variants; ValueError
    naming the row and the fix for anything a tuning cannot rest on."""
    rows = sweep.to_dict("records") if isinstance(sweep, pd.DataFrame) else list(sweep)
    if not rows:
        raise ValueError(
            "the sweep is empty: tune_policy needs the stock batch-sweep rows "
            f"({', '.join(SWEEP_COLUMNS)}); run the batch sweep on the single-variant targets first"
        )
    found: dict[Candidate, dict[int, tuple[float, float]]] = {}
    ignored: set[str] = set()
    for i, row in enumerate(rows):
        absent = [c for c in SWEEP_COLUMNS if c not in row]
        if absent:
            raise ValueError(f"sweep row {i} lacks {absent}; every row needs {list(SWEEP_COLUMNS)}")
        variant, kernel, batch = row["variant"], row["kernel"], row["batch"]
        kernel = None if _missing(kernel) else kernel
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"sweep row {i}: variant {variant!r} is not a variant name (e.g. 'w8a8')")
        if variant in NOT_IN_MERGED_CHECKPOINT:
            ignored.add(variant)
            continue
        if kernel is not None and kernel not in int4_kernels:
            raise ValueError(
                f"sweep row {i} ({variant}): kernel {kernel!r} is not one of the int4 kernels "
                f"{list(int4_kernels)}; fix the row or pass int4_kernels"
            )
        if isinstance(batch, float) and batch.is_integer():
            batch = int(batch)
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"sweep row {i} ({variant}): batch {batch!r} is not a positive integer")
        where = f"{candidate_name((variant, kernel))} at batch {batch}"
        values = []
        for column in ("prefill_s", "tpot_ms"):
            value = row[column]
            if _missing(value):
                raise ValueError(
                    f"{where} has no {column} (the measurement failed); re-run it, or drop batch {batch} "
                    "from every variant's rows"
                )
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{where}: {column}={value!r} is not a positive time")
            values.append(float(value))
        per_batch = found.setdefault((variant, kernel), {})
        if batch in per_batch:
            raise ValueError(f"{where} appears twice in the sweep; keep one measurement per batch")
        per_batch[batch] = (values[0], values[1])
    if not found:
        raise ValueError(f"the sweep holds only {sorted(ignored)}, which the merged checkpoint does not have")
    batches = sorted({b for per_batch in found.values() for b in per_batch})
    gaps = [
        f"{candidate_name(c)} lacks batch(es) {[b for b in batches if b not in per_batch]}"
        for c, per_batch in found.items()
        if len(per_batch) < len(batches)
    ]
    if gaps:
        raise ValueError(
            "the sweep is inconsistent: " + "; ".join(gaps) + ". Every variant must be measured at the "
            "same batches; re-run the missing points or drop those batches from every variant"
        )
    return found, batches, sorted(ignored)
