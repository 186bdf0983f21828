"""The FlexQuant policy: data (validated with pydantic) plus one pure `decide()`.

Every runtime (vLLM plugin, CPU reference) and every test calls the same `decide()`, so what the
telemetry shows is what the policy says. Policies are parsed from YAML/JSON with `yaml.safe_load`
behind size and nesting limits: never `eval`, never arbitrary objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "DecodeRule",
    "LayerRule",
    "Policy",
    "PolicyError",
    "StepInfo",
    "decide",
    "fixed_policy",
    "kernel_hints",
    "parse_policy",
    "policy_to_yaml",
    "check_policy_for",
]

MAX_POLICY_BYTES = 64 * 1024
MAX_NESTING = 8
MAX_BATCH_LIMIT = 1 << 16
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the field and the fix."""


class DecodeRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int | None = Field(default=None, ge=1, le=MAX_BATCH_LIMIT)
    variant: str = Field(pattern=r"^[a-z0-9_]{1,32}$")
    # Optional int4 kernel for this range ("marlin" or "machete"): the vLLM runtime loads it for the
    # variant (unless told otherwise); the CPU runtime has one kernel and ignores it.
    kernel: str | None = Field(default=None, pattern=r"^(marlin|machete)$")


class LayerRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    first: int = Field(ge=0, le=4096)
    last: int = Field(ge=0, le=4096)
    variant: str = Field(pattern=r"^[a-z0-9_]{1,32}$")

    @model_validator(mode="after")
    def _ordered(self) -> LayerRule:
        if self.last < self.first:
            raise ValueError(f"layer range first={self.first} last={self.last}: last must be >= first")
        return self


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_RE)
    prefill: str = Field(pattern=r"^[a-z0-9_]{1,32}$")
    decode: list[DecodeRule] = Field(min_length=1, max_length=64)
    layers: list[LayerRule] = Field(default_factory=list, max_length=256)

    @field_validator("decode")
    @classmethod
    def _decode_rules_ordered(cls, rules: list[DecodeRule]) -> list[DecodeRule]:
        if rules[-1].max_batch is not None:
            raise ValueError("the last decode rule must have no max_batch (it catches every larger batch)")
        bounds = [r.max_batch for r in rules[:-1]]
        if any(b is None for b in bounds):
            raise ValueError("only the last decode rule may omit max_batch")
        if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:], strict=False)):  # type: ignore[operator]
            raise ValueError(f"decode max_batch values must strictly increase, got {bounds}")
        return rules

    @field_validator("layers")
    @classmethod
    def _layers_disjoint(cls, rules: list[LayerRule]) -> list[LayerRule]:
        spans = sorted((r.first, r.last) for r in rules)
        for (a0, a1), (b0, b1) in zip(spans, spans[1:], strict=False):
            if b0 <= a1:
                raise ValueError(f"layer ranges {a0}-{a1} and {b0}-{b1} overlap")
        return rules

    @property
    def variants(self) -> set[str]:
        return {self.prefill} | {r.variant for r in self.decode} | {r.variant for r in self.layers}


@dataclass(frozen=True)
class StepInfo:
    """What the runtime knows about one engine step when it must pick a variant."""

    num_prefill_tokens: int
    num_decode_reqs: int
    layer: int | None = None


def decide(policy: Policy, step: StepInfo) -> str:
    """The variant that computes this step (and layer). Pure: same inputs, same answer."""
    if step.layer is not None:
        for rule in policy.layers:
            if rule.first <= step.layer <= rule.last:
                return rule.variant
    if step.num_prefill_tokens > 0:
        return policy.prefill
    return decode_rule(policy, step.num_decode_reqs).variant


def decode_rule(policy: Policy, num_decode_reqs: int) -> DecodeRule:
    """First decode rule whose max_batch admits this many running decode requests."""
    for rule in policy.decode:
        if rule.max_batch is None or num_decode_reqs <= rule.max_batch:
            return rule
    raise AssertionError("unreachable: the last decode rule has no max_batch")  # validated


def fixed_policy(variant: str) -> Policy:
    """`all-<variant>`: the baseline that runs one variant everywhere on the same checkpoint."""
    return Policy(name=f"all-{variant}", prefill=variant, decode=[DecodeRule(variant=variant)])


def kernel_hints(*policies: Policy) -> dict[str, str]:
    """{variant: int4 kernel} that the policies' decode rules name. An engine loads one kernel per
    variant (the repacked weights differ per kernel), so two kernels for one variant: PolicyError."""
    named: dict[str, set[str]] = {}
    for policy in policies:
        for rule in policy.decode:
            if rule.kernel:
                named.setdefault(rule.variant, set()).add(rule.kernel)
    for variant, kernels in named.items():
        if len(kernels) > 1:
            raise PolicyError(
                f"the policies name int4 kernels {sorted(kernels)} for variant {variant}, but an engine "
                "loads one per variant; give policies that agree"
            )
    return {variant: kernels.pop() for variant, kernels in named.items()}


def check_policy_for(policy: Policy, variants: set[str] | list[str], num_layers: int | None = None) -> None:
    """Raise `PolicyError` if the policy names a variant or layer the checkpoint does not have."""
    known = set(variants)
    unknown = sorted(policy.variants - known)
    if unknown:
        raise PolicyError(
            f"policy {policy.name!r} uses variant(s) {unknown} but the checkpoint has {sorted(known)}; "
            "use one of those names"
        )
    if num_layers is not None:
        for rule in policy.layers:
            if rule.last >= num_layers:
                raise PolicyError(
                    f"policy {policy.name!r}: layer range {rule.first}-{rule.last} is past the model's "
                    f"last layer {num_layers - 1}"
                )


def _depth(obj: object, level: int = 0) -> int:
    if level > MAX_NESTING:
        return level
    if isinstance(obj, dict):
        return max([_depth(v, level + 1) for v in obj.values()], default=level + 1)
    if isinstance(obj, list):
        return max([_depth(v, level + 1) for v in obj], default=level + 1)
    return level


def _bracket_depth(text: str) -> int:
    """Deepest [ / { nesting of the text (quotes ignored: policy names and variants hold no brackets)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def parse_policy(text: str) -> Policy:
    """Parse YAML or JSON text into a validated `Policy`, or raise `PolicyError` saying what is wrong."""
    if len(text.encode("utf-8", "replace")) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy text is larger than {MAX_POLICY_BYTES} bytes; a policy is a few lines")
    # Aliases are how "billion laughs" YAML bombs expand; a policy never needs them.
    if re.search(r"(^|[\s\[{,])[&*][A-Za-z0-9_]", text):
        raise PolicyError("YAML anchors/aliases (& and *) are not allowed in a policy")
    if _bracket_depth(text) > MAX_NESTING:
        # Before PyYAML sees it: its scanner is quadratic on "[[[[..." (1,500 levels: ~4 s of CPU).
        raise PolicyError(f"policy nests deeper than {MAX_NESTING} levels")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy is not valid YAML/JSON: {exc}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively: "[[[[..." under the size limit
        raise PolicyError(f"policy nests deeper than {MAX_NESTING} levels") from None
    if not isinstance(data, dict):
        raise PolicyError("policy must be a mapping with keys name, prefill, decode (and optional layers)")
    if _depth(data) > MAX_NESTING:
        raise PolicyError(f"policy nests deeper than {MAX_NESTING} levels")
    return policy_from_dict(data)


def policy_from_dict(data: dict) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'policy'}: {err['msg']}" for err in exc.errors()
        )
        raise PolicyError(f"invalid policy: {problems}") from None


def policy_to_yaml(policy: Policy) -> str:
    return yaml.safe_dump(policy.model_dump(exclude_none=True, exclude_defaults=False), sort_keys=False)


def policy_to_json(policy: Policy) -> str:
    return json.dumps(policy.model_dump(exclude_none=True))


DEFAULT_POLICY = Policy(
    name="pd-batch-aware",
    prefill="w8a8",
    decode=[DecodeRule(max_batch=16, variant="w4a16"), DecodeRule(variant="w8a8")],
)
