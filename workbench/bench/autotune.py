"""Auto-tune a FlexQuant policy from the stock single-variant batch sweep.

Input: one row per stock target and batch (variant, kernel, batch, prefill_s, tpot_ms), measured side
by side in one run. Output: a `Policy` that keeps prefill on the fastest prefill variant and picks the
lowest-TPOT variant per decode batch range, the one int4 kernel the engine loads, and the evidence
(JSON-able) that is stored with the policy. The rules, and why:

- BF16 is not a variant of the merged checkpoint, so its rows are ignored (never chosen).
- One int4 kernel per engine: Marlin and Machete repack the same int4 weights differently; keeping
  both would double the int4 weight memory and break the <= 0.8x BF16 memory goal. The kernel whose
  envelope (per batch, the best of the non-int4 variants and int4@kernel) has the lowest geometric-mean
  TPOT is chosen; the geometric mean weighs a 10% gain at batch 1 like a 10% gain at batch 128.
- Prefill: the variant with the lowest prefill time at the most batches (ties: the lowest geometric
  mean of its prefill time over the per-batch best).
- Decode: the best variant per measured batch, except that a variant winning by less than `min_gain`
  (1%) is not worth a switch: among the variants within that margin the fewest batch ranges win, then
  the prefill variant, then the lowest TPOT.
- Boundaries: only the measured batches are known. Between measured batches b_i < b_j where the choice
  changes, max_batch = floor(sqrt(b_i * b_j)): the sweep is spaced geometrically (1, 4, 16, ...), so
  the midpoint on its log scale is the point equally far from both measurements. The last range has
  no max_batch and carries the last measured batch's choice to every larger batch.

Reading and checking the sweep rows (and dropping BF16) is `autotune_sweep`'s part.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from workbench.bench.autotune_sweep import Candidate, candidate_name, sweep_measurements
from workbench.policy import Policy, policy_from_dict, policy_to_yaml

__all__ = [
    "INT4_KERNELS",
    "TunedPolicy",
    "save_tuned_policy",
    "tune_policy",
]

INT4_KERNELS = ("marlin", "machete")  # tie-break order when two envelopes score the same
MIN_GAIN = 0.01  # a decode variant must win by at least this much to earn its own batch range


@dataclass(frozen=True)
class TunedPolicy:
    """The tuned policy, the int4 kernel to load (None without int4 rows), the per-batch table the
    choice was read from, and the same evidence as a JSON-able dict."""

    policy: Policy
    kernel: str | None
    table: pd.DataFrame
    data: dict

    def results_entry(self) -> dict:
        """The `autotune` block of a bench results JSON."""
        return {
            "policy_name": self.policy.name,
            "policy_yaml": policy_to_yaml(self.policy),
            "kernel": self.kernel,
            "data": self.data,
        }


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _choose_kernel(
    found: dict[Candidate, dict[int, tuple[float, float]]], batches: list[int], int4_kernels: tuple[str, ...]
) -> tuple[str | None, dict[str, float]]:
    base = [c for c in found if c[1] is None]
    scores = {}
    for kernel in int4_kernels:
        pool = base + [c for c in found if c[1] == kernel]
        if len(pool) > len(base):
            scores[kernel] = _geomean([min(found[c][b][1] for c in pool) for b in batches])
    if not scores:
        return None, {}
    return min(scores, key=lambda k: (scores[k], int4_kernels.index(k))), scores


def _choose_prefill(pool: list[Candidate], found, batches: list[int]) -> tuple[Candidate, dict]:
    best = {b: min(found[c][b][0] for c in pool) for b in batches}
    wins = {c: sum(found[c][b][0] == best[b] for b in batches) for c in pool}
    ratio = {c: _geomean([found[c][b][0] / best[b] for b in batches]) for c in pool}
    chosen = min(pool, key=lambda c: (-wins[c], ratio[c], pool.index(c)))
    evidence = {
        "wins": {candidate_name(c): wins[c] for c in pool},
        "geomean_ratio_to_best": {candidate_name(c): ratio[c] for c in pool},
    }
    return chosen, evidence


def _choose_decode(
    pool: list[Candidate], found, batches: list[int], prefill: str, min_gain: float
) -> list[Candidate]:
    """One candidate per batch: fewest ranges among the variants within `min_gain` of the best, then
    the most batches on the prefill variant, then the least TPOT lost (dynamic programming over batches)."""
    cost: dict[Candidate, tuple[int, int, float]] = {}
    back: list[dict[Candidate, Candidate | None]] = []
    for i, b in enumerate(batches):
        best = min(found[c][b][1] for c in pool)
        step_cost, step_back = {}, {}
        for c in pool:
            loss = found[c][b][1] / best - 1
            if loss > 0 and loss >= min_gain:
                continue  # the best beats c by at least min_gain here: c is not a choice at batch b
            own = (0, int(c[0] != prefill), loss)
            if i == 0:
                step_cost[c], step_back[c] = (1, *own[1:]), None
                continue
            prev = min(cost, key=lambda p: (_add(cost[p], (int(p != c), 0, 0.0)), pool.index(p)))
            step_cost[c], step_back[c] = _add(_add(cost[prev], (int(prev != c), 0, 0.0)), own), prev
        cost = step_cost
        back.append(step_back)
    last = min(cost, key=lambda c: (cost[c], pool.index(c)))
    chosen = [last]
    for step_back in reversed(back[1:]):
        chosen.append(step_back[chosen[-1]])
    return chosen[::-1]


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def tune_policy(
    sweep: list[dict] | pd.DataFrame,
    *,
    name: str = "auto",
    int4_kernels: tuple[str, ...] = INT4_KERNELS,
    min_gain: float = MIN_GAIN,
) -> TunedPolicy:
    """The policy (and int4 kernel) that the stock sweep says is fastest; see the module docstring."""
    if not 0 <= min_gain < 1:
        raise ValueError(
            f"min_gain={min_gain!r}: give the smallest TPOT gain worth a switch as a fraction, e.g. 0.01"
        )
    found, batches, ignored = sweep_measurements(sweep, tuple(int4_kernels))
    kernel, kernel_scores = _choose_kernel(found, batches, tuple(int4_kernels))
    pool = [c for c in found if c[1] is None or c[1] == kernel]
    variants = [c[0] for c in pool]
    doubled = sorted({v for v in variants if variants.count(v) > 1})
    if doubled:
        raise ValueError(
            f"variant(s) {doubled} appear both with and without an int4 kernel; give every int4 row its "
            f"kernel ({list(int4_kernels)}) and the others none"
        )
    prefill, prefill_evidence = _choose_prefill(pool, found, batches)
    per_batch = _choose_decode(pool, found, batches, prefill[0], min_gain)

    rules, ranges = [], []
    start = 0
    for i in range(1, len(batches) + 1):
        if i < len(batches) and per_batch[i] == per_batch[start]:
            continue
        variant, rule_kernel = per_batch[start]
        max_batch = math.isqrt(batches[i - 1] * batches[i]) if i < len(batches) else None
        rules.append({"max_batch": max_batch, "variant": variant, "kernel": rule_kernel})
        ranges.append({**rules[-1], "measured_batches": batches[start:i]})
        start = i
    policy = policy_from_dict({"name": name, "prefill": prefill[0], "decode": rules})

    table = pd.DataFrame({"batch": batches})
    for c in pool:
        table[f"prefill_s:{candidate_name(c)}"] = [found[c][b][0] for b in batches]
    for c in pool:
        table[f"tpot_ms:{candidate_name(c)}"] = [found[c][b][1] for b in batches]
    best_decode = [min(pool, key=lambda c, b=b: (found[c][b][1], pool.index(c))) for b in batches]
    table["prefill_best"] = [
        candidate_name(min(pool, key=lambda c, b=b: (found[c][b][0], pool.index(c)))) for b in batches
    ]
    table["decode_best"] = [candidate_name(c) for c in best_decode]
    table["decode_gain"] = [
        sorted(found[c][b][1] for c in pool)[1] / found[best][b][1] - 1 if len(pool) > 1 else math.nan
        for b, best in zip(batches, best_decode, strict=True)
    ]
    table["decode_choice"] = [candidate_name(c) for c in per_batch]
    table["decode_choice_tpot_ms"] = [found[c][b][1] for c, b in zip(per_batch, batches, strict=True)]

    data = {
        "method": "flexquant autotune v1 (see workbench/bench/autotune.py)",
        "min_gain": min_gain,
        "batches": batches,
        "ignored_variants": ignored,
        "measurements": {
            candidate_name(c): {
                "prefill_s": [found[c][b][0] for b in batches],
                "tpot_ms": [found[c][b][1] for b in batches],
            }
            for c in found
        },
        "kernel": kernel,
        "kernel_envelope_geomean_tpot_ms": kernel_scores,
        "prefill": {"variant": prefill[0], **prefill_evidence},
        "decode_per_batch": [candidate_name(c) for c in per_batch],
        "decode_ranges": ranges,
        "boundary": "max_batch = floor(sqrt(b_i * b_j)) between measured batches b_i < b_j",
    }
    return TunedPolicy(policy=policy, kernel=kernel, table=table, data=json.loads(json.dumps(data)))


def save_tuned_policy(engine, tuned: TunedPolicy):  # noqa: ANN001 - a SQLAlchemy Engine
    """Store the tuned policy under its name (origin "autotune") with its evidence; the PolicyRecord."""
    from storage.crud import save_policy  # here: the GPU machine's environment has no SQLAlchemy

    return save_policy(
        engine,
        name=tuned.policy.name,
        body_yaml=policy_to_yaml(tuned.policy),
        origin="autotune",
        data_json=json.dumps(tuned.data, sort_keys=True),
    )
