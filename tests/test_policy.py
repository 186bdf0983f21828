"""Policy parsing, validation and the pure decide() function."""

import pytest

from workbench.policy import (
    DEFAULT_POLICY,
    PolicyError,
    StepInfo,
    check_policy_for,
    decide,
    fixed_policy,
    parse_policy,
    policy_to_yaml,
)

PD_BATCH = """
name: pd-batch-aware
prefill: w8a8
decode:
  - {max_batch: 8, variant: w4a16}
  - {variant: w8a8}
layers:
  - {first: 0, last: 1, variant: w8a8}
"""


@pytest.mark.parametrize(
    ("prefill_tokens", "decode_reqs", "layer", "expected"),
    [
        (128, 0, None, "w8a8"),  # pure prefill
        (128, 3, None, "w8a8"),  # mixed step: prefill wins
        (0, 1, None, "w4a16"),
        (0, 8, None, "w4a16"),  # threshold is inclusive
        (0, 9, None, "w8a8"),
        (0, 4, 0, "w8a8"),  # pinned layer
        (0, 4, 1, "w8a8"),
        (0, 4, 2, "w4a16"),
    ],
)
def test_decide_table(prefill_tokens, decode_reqs, layer, expected):
    policy = parse_policy(PD_BATCH)
    assert decide(policy, StepInfo(prefill_tokens, decode_reqs, layer)) == expected


def test_yaml_round_trip():
    policy = parse_policy(PD_BATCH)
    assert parse_policy(policy_to_yaml(policy)) == policy


def test_fixed_policy_uses_one_variant_everywhere():
    policy = fixed_policy("w4a16")
    assert policy.name == "all-w4a16"
    for step in [StepInfo(100, 0), StepInfo(0, 1), StepInfo(0, 4096, 7)]:
        assert decide(policy, step) == "w4a16"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: x\nprefill: w8a8\ndecode: []\n", "decode"),
        ("name: x\nprefill: w8a8\ndecode:\n  - {max_batch: 4, variant: w4a16}\n", "last decode rule"),
        (
            "name: x\nprefill: w8a8\ndecode:\n  - {max_batch: 8, variant: w4a16}\n"
            "  - {max_batch: 4, variant: w4a16}\n  - {variant: w8a8}\n",
            "strictly increase",
        ),
        ("name: x\nprefill: w8a8\ndecode:\n  - {max_batch: -1, variant: w4a16}\n  - {variant: w8a8}\n", "max_batch"),
        ("name: x\nprefill: w8a8\ndecode:\n  - {max_batch: 99999999, variant: w4a16}\n  - {variant: w8a8}\n",
         "max_batch"),
        ("name: x\nprefill: w8a8\ndecode:\n  - {variant: w8a8}\nlayers:\n  - {first: 0, last: 3, variant: w8a8}\n"
         "  - {first: 2, last: 5, variant: w4a16}\n", "overlap"),
        ("name: x\nprefill: w8a8\ndecode:\n  - {variant: w8a8}\nlayers:\n  - {first: 5, last: 1, variant: w8a8}\n",
         "last must be >= first"),
        ("name: x\nprefill: w8a8\ndecode:\n  - {variant: w8a8}\nextra: 1\n", "extra"),
        ("- just\n- a list\n", "mapping"),
        ("name: [unclosed\n", "not valid YAML"),
        ("a: &x [1, 2]\nb: *x\n", "anchors"),
        ("name: x\nprefill: W8A8!\ndecode:\n  - {variant: w8a8}\n", "prefill"),
    ],
)
def test_bad_policies_are_rejected_with_a_reason(text, needle):
    with pytest.raises(PolicyError) as err:
        parse_policy(text)
    assert needle in str(err.value)


def test_deep_nesting_is_rejected():
    text = "name: x\nprefill: w8a8\ndecode: " + "[" * 20 + "]" * 20 + "\n"
    with pytest.raises(PolicyError, match="nests deeper"):
        parse_policy(text)


def test_oversized_policy_is_rejected():
    with pytest.raises(PolicyError, match="larger than"):
        parse_policy("name: x\n# " + "a" * 70_000)


def test_policy_checked_against_checkpoint_variants_and_layers():
    policy = parse_policy(PD_BATCH)
    check_policy_for(policy, {"w8a8", "w4a16"}, num_layers=30)
    with pytest.raises(PolicyError, match="fp8"):
        check_policy_for(fixed_policy("fp8"), {"w8a8", "w4a16"})
    with pytest.raises(PolicyError, match="last layer 0"):
        check_policy_for(policy, {"w8a8", "w4a16"}, num_layers=1)


def test_default_policy_is_pd_and_batch_aware():
    assert decide(DEFAULT_POLICY, StepInfo(10, 0)) == "w8a8"
    assert decide(DEFAULT_POLICY, StepInfo(0, 1)) == "w4a16"
    assert decide(DEFAULT_POLICY, StepInfo(0, 64)) == "w8a8"
