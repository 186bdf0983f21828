"""Policy tab: edit a policy as a form and as YAML, validate it, save it, apply it live, and see it.

Form and YAML are two views of one policy: a user edit on either side (`.input`, never `.change`,
so programmatic updates do not bounce back) rewrites the other. Validation is
`workbench.policy.parse_policy` plus `check_policy_for` against the chosen checkpoint's variants
and layer count; its message sits right under the editor.
"""

from __future__ import annotations

import logging
import math

import gradio as gr
import pandas as pd

from storage.crud import save_policy
from workbench import plots, views
from workbench.policy import (
    DEFAULT_POLICY,
    Policy,
    PolicyError,
    check_policy_for,
    parse_policy,
    policy_from_dict,
    policy_to_yaml,
)
from workbench.ui.checkpoints_panel import checkpoint_choices
from workbench.ui.common import TabHook, UIContext, user_error

log = logging.getLogger(__name__)

__all__ = ["build_policy_tab", "policy_to_form", "form_to_policy_dict", "validate_policy_text"]

DECODE_COLUMNS = ["max_batch", "variant"]
LAYER_COLUMNS = ["first", "last", "variant"]


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def policy_to_form(policy: Policy) -> tuple[str, str, pd.DataFrame, pd.DataFrame]:
    """(name, prefill variant, decode rules frame, layer rules frame) for the form widgets."""
    # Text cells: an empty max_batch (the catch-all rule) must stay empty, not become 0.
    decode = pd.DataFrame(
        [["" if r.max_batch is None else str(r.max_batch), r.variant] for r in policy.decode],
        columns=DECODE_COLUMNS,
    )
    layers = pd.DataFrame(
        [[str(r.first), str(r.last), r.variant] for r in policy.layers], columns=LAYER_COLUMNS
    )
    return policy.name, policy.prefill, decode, layers


def form_to_policy_dict(name: str, prefill: str, decode: pd.DataFrame, layers: pd.DataFrame) -> dict:
    """The policy dict the form describes; empty rows are skipped, an empty max_batch means
    "no limit" (the catch-all last rule). Validation is left to `policy_from_dict`."""

    def as_int(value, where: str):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            raise PolicyError(f"{where}: {value!r} is not a whole number") from None

    rules = []
    for i, row in enumerate(decode.itertuples(index=False)):
        max_batch, variant = row[0], row[1]
        if _blank(variant) and _blank(max_batch):
            continue
        rule = {"variant": str(variant).strip()}
        if not _blank(max_batch):
            rule["max_batch"] = as_int(max_batch, f"decode rule {i + 1} max_batch")
        rules.append(rule)
    overrides = []
    for i, row in enumerate(layers.itertuples(index=False)):
        if all(_blank(v) for v in row):
            continue
        overrides.append(
            {
                "first": as_int(row[0], f"layer rule {i + 1} first"),
                "last": as_int(row[1], f"layer rule {i + 1} last"),
                "variant": str(row[2]).strip(),
            }
        )
    return {"name": (name or "").strip(), "prefill": prefill, "decode": rules, "layers": overrides}


def validate_policy_text(text: str, info: views.CheckpointInfo | None) -> tuple[Policy | None, str]:
    """Parse and check a policy; returns (policy or None, a one-line verdict for the user)."""
    try:
        policy = parse_policy(text)
        if info is not None:
            check_policy_for(policy, info.variants, info.num_layers)
    except PolicyError as exc:
        return None, f"**Invalid:** {exc}"
    where = f" for checkpoint `{info.name}`" if info is not None else ""
    return policy, f"**Valid:** policy `{policy.name}`{where}"


def build_policy_tab(ctx: UIContext) -> TabHook:
    """Create and wire the Policy tab inside the current `gr.Blocks`; returns its refresh hook."""
    name0, prefill0, decode0, layers0 = policy_to_form(DEFAULT_POLICY)
    with gr.Row():
        ckpt = gr.Dropdown(
            checkpoint_choices(ctx), value=None, label="Check against checkpoint", elem_id="fq-pol-ckpt"
        )
        load = gr.Dropdown(
            list(views.policy_library(ctx.engine)), value=None, label="Load a policy", elem_id="fq-pol-load"
        )
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Form**")
            name = gr.Textbox(name0, label="Name")
            prefill = gr.Dropdown(
                ["w8a8", "w4a16"],
                value=prefill0,
                label="Prefill variant (any step with prefill tokens)",
                allow_custom_value=True,
                elem_id="fq-pol-prefill",
            )
            decode = gr.Dataframe(
                decode0,
                headers=DECODE_COLUMNS,
                datatype=["str", "str"],
                interactive=True,
                label="Decode rules (first match on running decode requests; last: no max_batch)",
            )
            layers = gr.Dataframe(
                layers0,
                headers=LAYER_COLUMNS,
                datatype=["str", "str", "str"],
                interactive=True,
                label="Per-layer overrides (optional)",
            )
        with gr.Column():
            gr.Markdown("**YAML**")
            yaml_box = gr.Code(
                policy_to_yaml(DEFAULT_POLICY),
                language="yaml",
                label="Policy YAML",
                interactive=True,
                elem_id="fq-pol-yaml",
            )
            verdict = gr.Markdown(
                validate_policy_text(policy_to_yaml(DEFAULT_POLICY), None)[1], elem_id="fq-pol-verdict"
            )
            with gr.Row():
                save_btn = gr.Button("Save policy", elem_id="fq-pol-save")
                apply_btn = gr.Button("Apply to running runtime", variant="primary", elem_id="fq-pol-apply")
            result = gr.Markdown(elem_id="fq-pol-result")
    picture = gr.Plot(
        plots.policy_figure(DEFAULT_POLICY), label="The policy as a picture", elem_id="fq-pol-plot"
    )

    def info_for(checkpoint_id) -> views.CheckpointInfo | None:
        if checkpoint_id is None:
            return None
        return views.checkpoint_info(ctx.engine, int(checkpoint_id))

    def figure(policy: Policy | None, info):
        if policy is None:
            return gr.skip()
        return plots.policy_figure(policy, num_layers=info.num_layers if info else None)

    def from_yaml(text, checkpoint_id):
        info = info_for(checkpoint_id)
        policy, message = validate_policy_text(text, info)
        if policy is None:
            return message, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (message, *policy_to_form(policy), figure(policy, info))

    form_outputs = [name, prefill, decode, layers]
    # As-you-type validation: one at a time and only the latest text, so a stale result of an
    # earlier keystroke can never overwrite the verdict on the current text.
    live = dict(show_progress="hidden", trigger_mode="always_last", concurrency_limit=1)
    yaml_box.input(from_yaml, [yaml_box, ckpt], [verdict, *form_outputs, picture], **live)

    def from_form(form_name, form_prefill, form_decode, form_layers, checkpoint_id):
        info = info_for(checkpoint_id)
        try:
            text = policy_to_yaml(
                policy_from_dict(form_to_policy_dict(form_name, form_prefill, form_decode, form_layers))
            )
        except PolicyError as exc:
            return f"**Invalid:** {exc}", gr.skip(), gr.skip()
        policy, message = validate_policy_text(text, info)
        return message, text, figure(policy, info)

    for widget in form_outputs:
        widget.input(from_form, [*form_outputs, ckpt], [verdict, yaml_box, picture], **live)

    def on_checkpoint(checkpoint_id, text):
        info = info_for(checkpoint_id)
        variants = info.variants if info else ["w8a8", "w4a16"]
        policy, message = validate_policy_text(text, info)
        return (
            gr.update(choices=variants),
            gr.update(choices=list(views.policy_library(ctx.engine, variants=variants))),
            message,
            figure(policy, info),
        )

    ckpt.change(on_checkpoint, [ckpt, yaml_box], [prefill, load, verdict, picture])

    def on_load(policy_name, checkpoint_id):
        if not policy_name:
            return (gr.skip(),) * 7
        info = info_for(checkpoint_id)
        library = views.policy_library(ctx.engine)
        if policy_name not in library:
            raise gr.Error(f"policy {policy_name!r} is not saved any more; pick another")
        text = policy_to_yaml(library[policy_name])
        policy, message = validate_policy_text(text, info)
        return (text, message, *policy_to_form(library[policy_name]), figure(policy, info))

    load.change(on_load, [load, ckpt], [yaml_box, verdict, *form_outputs, picture])

    def on_save(text, checkpoint_id):
        policy, message = validate_policy_text(text, info_for(checkpoint_id))
        if policy is None:
            raise gr.Error(f"not saved: {message.removeprefix('**Invalid:** ')}")
        try:
            save_policy(ctx.engine, name=policy.name, body_yaml=text)
        except Exception as exc:
            raise user_error(exc) from None
        return f"Saved policy **{policy.name}**.", gr.update(choices=list(views.policy_library(ctx.engine)))

    save_btn.click(on_save, [yaml_box, ckpt], [result, load])

    def on_apply(text):
        slot = ctx.runtime
        if not slot.running:
            raise gr.Error("no runtime is running: start one in the Runtime tab first")
        info = info_for(slot.checkpoint_id) if slot.checkpoint_id is not None else None
        policy, message = validate_policy_text(text, info)
        if policy is None:
            raise gr.Error(f"not applied: {message.removeprefix('**Invalid:** ')}")
        try:
            answer = slot.handle.set_policy(policy)
        except Exception as exc:
            raise user_error(exc) from None
        slot.policy = policy
        step = answer.get("applied_at_step") if isinstance(answer, dict) else None
        at = f" from engine step {step}" if step is not None else ""
        return f"Applied **{policy.name}** to `{slot.checkpoint_name}`{at}. Watch it in the Live tab."

    apply_btn.click(on_apply, yaml_box, result)

    def refresh(checkpoint_id):
        fresh = checkpoint_choices(ctx)
        if checkpoint_id is None and ctx.runtime.checkpoint_id is not None:
            checkpoint_id = ctx.runtime.checkpoint_id  # check against what is being served
        keep = checkpoint_id if checkpoint_id in [i for _, i in fresh] else None
        return gr.update(choices=fresh, value=keep), gr.update(choices=list(views.policy_library(ctx.engine)))

    return TabHook(refresh, [ckpt], [ckpt, load])
