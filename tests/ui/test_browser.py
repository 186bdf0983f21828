"""End-to-end flows in headless Chromium against the real app, worker and CPU runtime.

The tests run in file order and build on each other, as a user would: quantize a model, serve the
checkpoint, chat with it, change its policy live, compare policies. Each flow saves a screenshot of
its tab (into FLEXQUANT_SCREENSHOT_DIR when set, e.g. docs/screenshots). By default the model is a
tiny random Llama (about 3 minutes in all); FLEXQUANT_UI_REAL_MODEL=1 runs the same flows on the
embedded SmolLM2-135M-Instruct instead (the documentation screenshots; about 15 minutes).
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from uihelpers import REAL_MODEL, choose, free_port, shot

pytestmark = pytest.mark.browser

# SmolLM2's quantize job takes minutes on two shared cores; the tiny model's takes seconds.
JOB_TIMEOUT_MS = 2_400_000 if REAL_MODEL else 300_000
CKPT = "smollm2-flex" if REAL_MODEL else "tiny-flex"
NEW_POLICY = "name: prefill-w4a16\nprefill: w4a16\ndecode:\n- variant: w8a8\n"


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def wait_job_done(page, app, job_id: int) -> None:
    row = page.locator(f"#fq-jobs tr[data-job-id='{job_id}']")
    expect(row).to_have_attribute(
        "data-status", re.compile("done|failed|cancelled|interrupted"), timeout=JOB_TIMEOUT_MS
    )
    status = row.get_attribute("data-status")
    assert status == "done", f"job {job_id} ended {status}: {row.inner_text()}\n{app.log_tail()}"


def fill_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def run_load(page, count: int, *, words: int = 8, tokens: int = 8) -> None:
    """Drive the server from the Live tab; `count` differs per call so the result line is new."""
    open_tab(page, "Live")
    fill_number(page, "fq-load-rate", 0)
    fill_number(page, "fq-load-words", words)
    fill_number(page, "fq-load-tokens", tokens)
    fill_number(page, "fq-load-count", count)
    page.locator("#fq-load-start").click()
    expect(page.locator("#fq-load-result")).to_contain_text(f"Sent {count} requests", timeout=120_000)
    expect(page.locator("#fq-load-result")).to_contain_text("(0 errors)")


def test_add_model_quantize_and_evaluate(page, app):
    if REAL_MODEL:
        model = "smollm2-135m-instruct"
        page.locator("#fq-default-model").click()  # converts the embedded GGUF once (~1 min)
        expect(page.locator("#fq-model-status")).to_contain_text(
            f"Default model {model} is registered", timeout=JOB_TIMEOUT_MS
        )
    else:
        model = "tiny-base"
        page.locator("#fq-model-name input, #fq-model-name textarea").first.fill(model)
        page.locator("#fq-model-path input, #fq-model-path textarea").first.fill(
            str(app.data_dir / "models" / model)
        )
        page.locator("#fq-model-add").click()
        expect(page.locator("#fq-model-status")).to_contain_text(f"Added {model}")

    choose(page, "fq-src-model", model)  # the list refreshed itself from the DB
    page.locator("#fq-ckpt-name input, #fq-ckpt-name textarea").first.fill(CKPT)
    calibration = app.data_dir.parent / "my-calibration.txt"  # outside the data dir: an upload
    calibration.write_text(
        "\n".join(f"Calibration document {i} about lighthouses and the sea." for i in range(8))
    )
    page.locator("#fq-calib-file input[type=file]").set_input_files(str(calibration))
    # Gradio writes the name as two spans, stem and extension, with a space between them in the markup;
    # whether the text read back keeps it ("my-calibration .txt") has varied from run to run
    expect(page.locator("#fq-calib-file")).to_contain_text(re.compile(r"my-calibration\s*\.txt"))
    fill_number(page, "fq-samples", 8)
    fill_number(page, "fq-seq-len", 64)
    page.locator("#fq-submit").click()
    expect(page.locator("#fq-submit-status")).to_contain_text("Queued job #1")
    expect(page.locator("#fq-jobs tr[data-job-id='1'] .fq-bar")).to_be_visible()
    wait_job_done(page, app, 1)

    choose(page, "fq-open-ckpt", CKPT)
    expect(page.get_by_text("w4a16").first).to_be_visible()
    # the upload was kept inside the data dir for the worker, and the manifest records it
    expect(page.locator("#fq-manifest")).to_contain_text(str(app.data_dir / "uploads"))
    fill_number(page, "fq-eval-docs", 4)  # a policy target decodes token by token: keep it short
    fill_number(page, "fq-eval-seq", 128)
    page.locator("#fq-eval").click()
    expect(page.locator("#fq-eval-status")).to_contain_text("Queued evaluation job #2")
    wait_job_done(page, app, 2)
    evals = page.locator("#fq-evals")
    for target in ("bf16", "all-w8a8", "all-w4a16"):
        expect(evals).to_contain_text(target, timeout=15_000)
    shot(app, page, "models_jobs")
    page.locator("#fq-jobs").scroll_into_view_if_needed()
    page.screenshot(path=str(app.shots / "models_jobs_queue.png"))


def test_start_runtime_and_chat(page, app):
    open_tab(page, "Runtime")
    choose(page, "fq-rt-ckpt", CKPT)
    expect(page.locator("#fq-rt-policy input")).to_have_value("pd-batch-aware")
    page.locator("#fq-rt-kind").get_by_text("cpu", exact=True).click()
    expect(page.locator("#fq-rt-prefill-graphs input")).not_to_be_checked()  # vLLM only, opt-in
    fill_number(page, "fq-rt-port", free_port())
    page.locator("#fq-rt-start").click()
    expect(page.locator("#fq-rt-status")).to_contain_text("Running", timeout=180_000)
    expect(page.locator("#fq-rt-status")).to_contain_text("CPU reference runtime")
    expect(page.locator("#fq-rt-memory")).to_contain_text("w4a16", timeout=15_000)
    shot(app, page, "runtime")
    page.locator("#fq-rt-start").click()  # a second server is refused, plainly
    expect(page.locator("#fq-rt-status")).to_contain_text("Could not start: a runtime is already running")
    expect(page.locator("#fq-rt-status")).to_contain_text("Running", timeout=10_000)  # the poll restores it

    open_tab(page, "Chat")
    page.locator("#fq-chat-input textarea").fill("Hello, who are you?")
    page.locator("#fq-chat-send").click()
    expect(page.locator("#fq-chat-stats")).to_contain_text("Last reply", timeout=120_000)
    stats = page.locator("#fq-chat-stats").inner_text()
    assert re.search(r"TTFT \d+ ms · TPOT [\d.]+ ms · \d+ tokens · served by w4a16", stats), stats
    expect(page.locator("#fq-chatbot")).to_contain_text("TTFT")  # the footer under the reply
    if REAL_MODEL:  # the tiny model finishes 1000 tokens before a click lands; SmolLM2 does not
        page.get_by_role("button", name="Settings ▼").click()
        fill_number(page, "fq-chat-max-tokens", 1000)
        page.locator("#fq-chat-input textarea").fill("Write a very long story about a lighthouse.")
        page.locator("#fq-chat-send").click()
        expect(page.locator("#fq-chat-stats")).to_contain_text("streaming", timeout=60_000)
        page.locator("#fq-chat-stop").click()
        expect(page.locator("#fq-chat-stats")).to_contain_text("Stopped", timeout=30_000)
        tokens = int(re.search(r"(\d+) tokens", page.locator("#fq-chat-stats").inner_text()).group(1))
        assert tokens < 1000
    shot(app, page, "chat")


def test_edit_policy_and_see_it_live(page, app):
    run_load(page, 6)  # some steps under the starting policy
    open_tab(page, "Policy")
    editor = page.locator("#fq-pol-yaml .cm-content")
    choose(page, "fq-pol-prefill", "w4a16")  # a form edit rewrites the YAML
    expect(editor).to_contain_text("prefill: w4a16")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.type("name: [")
    expect(page.locator("#fq-pol-verdict")).to_contain_text("Invalid")  # errors are shown as you type
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(NEW_POLICY)
    page.keyboard.type(" ")  # one typed key: CodeMirror reports pasted text only with the next input
    expect(page.locator("#fq-pol-verdict")).to_contain_text(
        f"Valid: policy prefill-w4a16 for checkpoint {CKPT}"
    )
    expect(page.locator("#fq-pol-plot")).to_contain_text("prefill: w4a16")  # the picture follows the text
    page.locator("#fq-pol-save").click()
    expect(page.locator("#fq-pol-result")).to_contain_text("Saved policy prefill-w4a16")
    page.locator("#fq-pol-apply").click()
    expect(page.locator("#fq-pol-result")).to_contain_text("Applied prefill-w4a16")
    shot(app, page, "policy")

    run_load(page, 7)  # steps under the new policy
    expect(page.locator("#fq-live-timeline")).to_contain_text("policy → prefill-w4a16", timeout=15_000)
    expect(page.locator("#fq-live-timeline")).to_contain_text("w4a16 prefill")  # legend: prefill now w4a16
    expect(page.locator("#fq-live-summary")).to_contain_text("policy now prefill-w4a16")
    page.wait_for_timeout(2500)  # let the last requests' telemetry land before the picture
    shot(app, page, "live")


def test_compare_policies_and_arena(page, app):
    open_tab(page, "Compare")
    picks = page.locator("#fq-cmp-policies")
    expect(picks).to_contain_text("prefill-w4a16")  # the saved policy is offered
    for name in ("pd-batch-aware", "prefill-w4a16"):
        box = picks.get_by_label(name, exact=True)
        if not box.is_checked():
            box.check()
    for name in ("all-w8a8", "all-w4a16"):
        box = picks.get_by_label(name, exact=True)
        if box.is_checked():
            box.uncheck()
    page.locator("#fq-cmp-rates input, #fq-cmp-rates textarea").first.fill("0, 4")
    fill_number(page, "fq-cmp-count", 3)
    fill_number(page, "fq-cmp-words", 8)
    fill_number(page, "fq-cmp-tokens", 8)
    page.locator("#fq-cmp-run").click()
    expect(page.locator("#fq-cmp-verdict")).to_contain_text("Winner on TPOT p50", timeout=180_000)
    expect(page.locator("#fq-cmp-verdict")).to_contain_text("Errors: 0")
    plot = page.locator("#fq-cmp-plot")
    expect(plot).to_contain_text("pd-batch-aware")
    expect(plot).to_contain_text("prefill-w4a16")
    expect(plot).to_contain_text("★")  # the winner is marked

    choose(page, "fq-arena-policy-0", "all-w8a8")
    choose(page, "fq-arena-policy-1", "all-w4a16")
    page.locator("#fq-arena-input textarea").fill("Tell me a story")
    page.locator("#fq-arena-send").click()
    for side, policy in enumerate(("all-w8a8", "all-w4a16")):
        stats = page.locator(f"#fq-arena-stats-{side}")
        expect(stats).to_contain_text(policy, timeout=120_000)
        expect(stats).to_contain_text("TTFT")
    shot(app, page, "compare")
