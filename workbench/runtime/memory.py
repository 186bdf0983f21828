"""Resident weight memory of a merged checkpoint: per variant, shared, total, and vs BF16.

The numbers are the bytes of the checkpoint's tensors as stored (int8 weights, packed int4 words,
scales), i.e. what a real int8/int4 runtime keeps resident; the CPU reference holds dequantized
copies, which is an emulation detail and not what this report is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.policy import Policy, StepInfo, decide


def variants_needed(policy: Policy, layer: int | None) -> set[str]:
    """Every variant `decide` can pick for this layer, over all step shapes the policy distinguishes.

    Probes `decide` itself (one prefill step and one decode batch size per decode rule) instead of
    re-reading the rules, so this stays right if the policy function grows.
    """
    probes = [StepInfo(num_prefill_tokens=1, num_decode_reqs=0, layer=layer)]
    bounds = [r.max_batch for r in policy.decode if r.max_batch is not None]
    for batch in [*bounds, (bounds[-1] + 1) if bounds else 1]:
        probes.append(StepInfo(num_prefill_tokens=0, num_decode_reqs=batch, layer=layer))
    return {decide(policy, p) for p in probes}


@dataclass
class MemoryReport:
    """Quantized bytes per variant, the shared tensors, and the BF16 size of the same model."""

    per_variant: dict[str, int]
    shared: int
    bf16: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.shared + sum(self.per_variant.values())

    @property
    def ratio_vs_bf16(self) -> float:
        """Total resident bytes / BF16 bytes; FlexQuant's claim is < 1 even with two variants."""
        return self.total / self.bf16 if self.bf16 else float("nan")

    def as_dict(self) -> dict:
        return {
            "per_variant": dict(self.per_variant),
            "shared": self.shared,
            "total": self.total,
            "bf16": self.bf16,
            "ratio_vs_bf16": round(self.ratio_vs_bf16, 4),
            "dropped": dict(self.dropped),
        }
