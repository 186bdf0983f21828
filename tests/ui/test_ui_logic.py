"""The UI's small pieces of glue, without a browser: policy form <-> dict, validation verdicts,
load parsing, exposure refusal (also as the real `app.py` process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from workbench.policy import DecodeRule, LayerRule, Policy, policy_from_dict, policy_to_yaml
from workbench.ui.app import ExposureError, check_exposure
from workbench.ui.compare import parse_rates
from workbench.ui.policy import form_to_policy_dict, policy_to_form, validate_policy_text
from workbench.views import CheckpointInfo

ROOT = Path(__file__).resolve().parents[2]
POLICY = Policy(
    name="p",
    prefill="w8a8",
    decode=[DecodeRule(max_batch=8, variant="w4a16"), DecodeRule(variant="w8a8")],
    layers=[LayerRule(first=0, last=1, variant="w8a8")],
)


def test_form_round_trip():
    name, prefill, decode, layers = policy_to_form(POLICY)
    assert list(decode["max_batch"]) == ["8", ""]  # the catch-all rule shows an empty cell, not 0
    assert policy_from_dict(form_to_policy_dict(name, prefill, decode, layers)) == POLICY


def test_form_skips_empty_rows_and_reads_numbers_typed_as_text():
    decode = pd.DataFrame(
        [["4", "w4a16"], ["", ""], [float("nan"), "w8a8"]], columns=["max_batch", "variant"]
    )
    layers = pd.DataFrame([["", "", ""], [" 2", "3.0", "w4a16"]], columns=["first", "last", "variant"])
    data = form_to_policy_dict(" q ", "w8a8", decode, layers)
    assert data == {
        "name": "q",
        "prefill": "w8a8",
        "decode": [{"variant": "w4a16", "max_batch": 4}, {"variant": "w8a8"}],
        "layers": [{"first": 2, "last": 3, "variant": "w4a16"}],
    }


def test_form_bad_number_names_the_cell():
    decode = pd.DataFrame([["many", "w4a16"]], columns=["max_batch", "variant"])
    with pytest.raises(ValueError, match="decode rule 1 max_batch: 'many'"):
        form_to_policy_dict("q", "w8a8", decode, pd.DataFrame(columns=["first", "last", "variant"]))


def test_validate_against_checkpoint():
    info = CheckpointInfo(1, "ck", Path("/x"), ["w8a8", "w4a16"], 2, None)
    policy, verdict = validate_policy_text(policy_to_yaml(POLICY), info)
    assert policy == POLICY and verdict.startswith("**Valid:**") and "`ck`" in verdict
    wider = POLICY.model_copy(update={"layers": [LayerRule(first=0, last=5, variant="w8a8")]})
    policy, verdict = validate_policy_text(policy_to_yaml(wider), info)
    assert policy is None and "past the model's last layer 1" in verdict
    policy, verdict = validate_policy_text("name: x\nprefill: fp4\ndecode: [{variant: fp4}]", info)
    assert policy is None and "fp4" in verdict
    policy, verdict = validate_policy_text("name: [", None)
    assert policy is None and verdict.startswith("**Invalid:**")


def test_parse_rates():
    assert parse_rates("0.5, 1;2 ,") == [0.5, 1.0, 2.0]
    for bad, message in (("", "at least one"), ("1, fast", "'fast' is not a number"), ("-1", "negative")):
        with pytest.raises(ValueError, match=message):
            parse_rates(bad)


def test_exposure_needs_credentials():
    assert check_exposure("127.0.0.1", False, None, None) is None
    assert check_exposure("localhost", False, "u", "p") == ("u", "p")
    assert check_exposure("0.0.0.0", False, "u", "p") == ("u", "p")
    for host, share in (("0.0.0.0", False), ("192.168.1.5", False), ("127.0.0.1", True)):
        with pytest.raises(ExposureError, match="FLEXQUANT_USERNAME and FLEXQUANT_PASSWORD"):
            check_exposure(host, share, "u", None)


def test_app_refuses_to_expose_itself_without_login(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FLEXQUANT_USERNAME", "FLEXQUANT_PASSWORD")}
    result = subprocess.run(
        [sys.executable, "app.py", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "refusing to serve the workbench on host 0.0.0.0 without a login" in result.stderr
    assert not (tmp_path / "d").exists()  # refused before touching anything
