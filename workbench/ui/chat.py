"""Chat playground tab: stream a conversation with the running model and see how each reply was served.

Each assistant message carries a footer with its client-side TTFT and TPOT and the variant mix of
the engine steps that produced it (from the runtime's `RequestRecord`). The model sees the clean
history kept in `gr.State`, never those footers. Stop closes the HTTP stream, which aborts the
request on the server.
"""

from __future__ import annotations

import logging
import time

import gradio as gr

from workbench import views_telemetry
from workbench.chat_client import ChatStats, stream_chat
from workbench.ui.common import UIContext, user_error

log = logging.getLogger(__name__)

__all__ = ["build_chat_tab", "stats_footer", "served_by"]

TELEMETRY_WAIT_S = 3.0  # the runtime writes request rows in batches, about once a second


def served_by(ctx: UIContext, request_id: str, *, wait_s: float = TELEMETRY_WAIT_S) -> str:
    """The variant mix of a finished request as text, waiting briefly for its telemetry row."""
    deadline = time.monotonic() + wait_s
    while request_id:
        record = views_telemetry.request_record(ctx.engine, request_id)
        if record is not None and record.get("variant_mix"):
            return views_telemetry.format_variant_mix(record["variant_mix"])
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return "variant mix not recorded"


def stats_footer(stats: ChatStats, mix: str | None) -> str:
    """One line of timings for under a reply."""
    ttft = f"{stats.ttft_ms:.0f} ms" if stats.ttft_ms is not None else "—"
    tpot = f"{stats.tpot_ms:.1f} ms" if stats.tpot_ms is not None else "—"
    text = f"TTFT {ttft} · TPOT {tpot} · {stats.output_tokens} tokens"
    return text + (f" · served by {mix}" if mix else "")


def _with_footer(history: list[dict]) -> list[dict]:
    """The chatbot view: each assistant message with its timing footer (kept under "footer")."""
    shown = []
    for msg in history:
        footer = msg.get("footer")
        content = msg["content"] + (f"\n\n<sub>{footer}</sub>" if footer else "")
        shown.append({"role": msg["role"], "content": content})
    return shown


def _for_model(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in history]


def build_chat_tab(ctx: UIContext) -> None:
    """Create and wire the Chat tab inside the current `gr.Blocks`."""
    history = gr.State([])  # [{"role", "content", "footer"?}]: per browser session
    chatbot = gr.Chatbot(
        label="Chat with the running model", height=420, elem_id="fq-chatbot", feedback_options=None
    )
    with gr.Row():
        prompt = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5, elem_id="fq-chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="fq-chat-send")
        stop = gr.Button("Stop", scale=1, elem_id="fq-chat-stop")
        clear = gr.Button("Clear", scale=1)
    with gr.Accordion("Settings", open=False):
        system = gr.Textbox("You are a helpful assistant.", label="System prompt")
        max_tokens = gr.Slider(
            8, 1024, value=128, step=8, label="Max new tokens", elem_id="fq-chat-max-tokens"
        )
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature")
    last = gr.Markdown(elem_id="fq-chat-stats")

    def add_user(text, hist):
        if not text or not text.strip():
            raise gr.Error("type a message first")
        return "", hist + [{"role": "user", "content": text.strip()}]

    # Sessions whose Stop was pressed. A flag the streaming loop checks, not Gradio's `cancels`:
    # closing our generator is what closes the HTTP stream, and that is what stops the server.
    stopping: set[str] = set()

    def reply(hist, system_prompt, n_tokens, temp, request: gr.Request):
        session = request.session_hash or ""
        stopping.discard(session)
        try:
            base_url = ctx.runtime.base_url()
        except Exception as exc:
            raise user_error(exc) from None
        messages = (
            [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        ) + _for_model(hist)
        answer = {"role": "assistant", "content": ""}
        hist = hist + [answer]
        stats, stopped = ChatStats(), False
        stream = stream_chat(base_url, messages, max_tokens=int(n_tokens), temperature=float(temp))
        try:
            for update in stream:
                answer["content"], stats = update.text, update.stats
                if session in stopping:
                    stopped = True
                    break
                if not update.done:
                    yield hist, _with_footer(hist), f"TTFT {stats.ttft_ms or 0:.0f} ms · streaming…"
        except Exception as exc:
            raise user_error(exc) from None
        finally:
            stream.close()
            stopping.discard(session)
        footer = stats_footer(stats, None if stopped else served_by(ctx, stats.request_id))
        answer["footer"] = footer + (" · stopped" if stopped else "")
        yield hist, _with_footer(hist), f"{'Stopped' if stopped else 'Last reply'}: {answer['footer']}"

    gr.on([send.click, prompt.submit], add_user, [prompt, history], [prompt, history]).then(
        _with_footer, history, chatbot
    ).then(reply, [history, system, max_tokens, temperature], [history, chatbot, last])

    def on_stop(request: gr.Request):
        stopping.add(request.session_hash or "")

    stop.click(on_stop, None, None)
    clear.click(lambda: ([], [], ""), None, [history, chatbot, last])
