"""Browser-test fixtures: the real app in a subprocess (own data dir, free port), Debian's chromium.

The app is started exactly as a user starts it (`python app.py --data-dir ... --port ...`), so the
job worker and the CPU runtime are real processes too. A tiny random Llama with a byte-level
tokenizer is put in the data dir as the model to quantize: real llmcompressor work that takes
seconds, not minutes, on two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from uihelpers import CHROMIUM, CHROMIUM_ARGS, REAL_MODEL, free_port

ROOT = Path(__file__).resolve().parents[2]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_model(out_dir: Path) -> Path:
    """A random 2-layer Llama (hidden 128) with a byte-level ChatML tokenizer, as an HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=272,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=256,
        torch_dtype="bfloat16",
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out_dir)
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return out_dir


class App:
    """The running app process and where it keeps its data."""

    def __init__(self, url: str, data_dir: Path, proc: subprocess.Popen, log_path: Path, shots: Path):
        self.url, self.data_dir, self.proc, self.log_path, self.shots = url, data_dir, proc, log_path, shots

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def app(tmp_path_factory) -> App:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    data_dir = tmp_path_factory.mktemp("appdata")
    if not REAL_MODEL:
        write_tiny_model(data_dir / "models" / "tiny-base")
    port = free_port()
    log_path = data_dir / "app.log"
    # The tests add the models they need; converting SmolLM2 at start would only cost CPU here.
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLEXQUANT_PREPARE_DEFAULT_MODEL="0")
    for key in ("FLEXQUANT_USERNAME", "FLEXQUANT_PASSWORD"):
        env.pop(key, None)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--data-dir", str(data_dir), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    shots = Path(os.environ.get("FLEXQUANT_SCREENSHOT_DIR") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    running = App(url, data_dir, proc, log_path, shots)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the app did not start:\n{running.log_tail()}")
        time.sleep(0.5)
    yield running
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)  # the app must stop its worker and runtime on its way out
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the app ignored SIGTERM:\n{running.log_tail()}")
    gone, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"processes left behind by the app: {[p.pid for p in alive]}"


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(app.url)
    pg.get_by_text("FlexQuant Workbench").first.wait_for()
    yield pg
    context.close()
