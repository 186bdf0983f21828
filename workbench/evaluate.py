"""Accuracy evaluation: perplexity, top-1 accuracy and top-1 agreement with BF16, on held-out text.

Targets are the unquantized source model ("bf16"), each variant alone (`all-<variant>`), and any
policy. A policy that mixes variants is evaluated the way it would generate: the first `prefix_len`
tokens of each document go through one prefill step under the policy, then every further token is
one decode step (with KV cache) under the policy at `decode_batch` running requests. All targets
are scored on the same positions (the tokens after the prefix), so the numbers compare directly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from jobs.progress import Reporter
from jobs.registry import job_kind
from workbench.policy import Policy, StepInfo, fixed_policy
from workbench.runtime.flexmodel import FlexModel

log = logging.getLogger(__name__)


@dataclass
class EvalRow:
    target: str
    perplexity: float
    top1_accuracy: float
    token_agreement: float
    num_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Tally:
    nll: float = 0.0
    correct: int = 0
    agree: int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, ref_top1: torch.Tensor) -> None:
        # logits: [T, vocab] predicting targets: [T]
        self.nll += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        top1 = logits.argmax(-1)
        self.correct += int((top1 == targets).sum())
        self.agree += int((top1 == ref_top1).sum())
        self.count += int(targets.numel())

    def row(self, target: str) -> EvalRow:
        n = max(self.count, 1)
        return EvalRow(target, math.exp(self.nll / n), self.correct / n, self.agree / n, self.count)


def _mixes_variants(policy: Policy, decode_batch: int, num_layers: int) -> bool:
    from workbench.policy import decide

    steps = [StepInfo(1, 0, layer) for layer in range(num_layers)]
    steps += [StepInfo(0, decode_batch, layer) for layer in range(num_layers)]
    return len({decide(policy, s) for s in steps}) > 1


@torch.inference_mode()
def _policy_logits(flex: FlexModel, policy: Policy, ids: torch.Tensor, prefix_len: int, decode_batch: int):
    """Logits [L-1, vocab] produced step by step, exactly as generation under `policy` would."""
    flex.set_step(policy, StepInfo(num_prefill_tokens=prefix_len, num_decode_reqs=0))
    out = flex.model(ids[:, :prefix_len], use_cache=True)
    pieces, cache = [out.logits[0]], out.past_key_values
    for t in range(prefix_len, ids.shape[1] - 1):
        flex.set_step(policy, StepInfo(num_prefill_tokens=0, num_decode_reqs=decode_batch))
        out = flex.model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        pieces.append(out.logits[0])
        cache = out.past_key_values
    return torch.cat(pieces)[: ids.shape[1] - 1]


@torch.inference_mode()
def evaluate_checkpoint(
    ckpt_dir: Path,
    source_dir: Path | None,
    texts: list[str],
    *,
    policies: list[Policy] = (),
    seq_len: int = 256,
    prefix_len: int = 32,
    decode_batch: int = 1,
    reporter: Reporter | None = None,
) -> list[EvalRow]:
    """Score BF16 (if `source_dir`), every variant and every policy on the same token positions."""
    reporter = reporter or Reporter()
    if source_dir is not None and not (Path(source_dir) / "config.json").is_file():
        # checked here, not left to transformers, which would take the path for a model-hub repo id
        raise ValueError(
            f"the BF16 reference {source_dir} has no config.json (moved or deleted?); add the source "
            "model again (flexquant models add) or evaluate without the BF16 reference"
        )
    reporter.update("load", 0, f"loading {ckpt_dir}")
    flex = FlexModel.load(Path(ckpt_dir), dtype=torch.float32)
    tokenizer = flex.tokenizer
    docs = [tokenizer(t, return_tensors="pt").input_ids[:, :seq_len] for t in texts]
    docs = [d for d in docs if d.shape[1] > prefix_len + 1]
    if not docs:
        raise ValueError(f"no evaluation document is longer than prefix_len={prefix_len}+1 tokens")
    reference = None
    if source_dir is not None:
        reference = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    targets: list[tuple[str, Policy | None]] = [("bf16", None)] if reference is not None else []
    targets += [(f"all-{v}", fixed_policy(v)) for v in flex.variants]
    targets += [(p.name, p) for p in policies if p.name not in {name for name, _ in targets}]
    tallies = {name: _Tally() for name, _ in targets}
    for i, ids in enumerate(docs):
        reporter.check_cancelled()
        reporter.update("evaluate", 5 + 95 * i / len(docs), f"document {i + 1}/{len(docs)}")
        answer = ids[0, prefix_len:]
        # Reference top-1 is BF16's where there is BF16, else the first variant's.
        full = {}
        if reference is not None:
            full["bf16"] = reference(ids).logits[0, :-1]
        for variant in flex.variants:
            flex.use_variant(variant)
            full[f"all-{variant}"] = flex.model(ids).logits[0, :-1]
        ref_top1 = next(iter(full.values()))[prefix_len - 1 :].argmax(-1)
        for name, policy in targets:
            if name in full:
                logits = full[name]
            elif _mixes_variants(policy, decode_batch, flex.num_layers):
                logits = _policy_logits(flex, policy, ids, prefix_len, decode_batch)
            else:
                flex.set_step(policy, StepInfo(0, decode_batch))
                logits = flex.model(ids).logits[0, :-1]
            tallies[name].add(logits[prefix_len - 1 :], answer, ref_top1)
    rows = [tallies[name].row(name) for name, _ in targets]
    for row in rows:
        reporter.log(
            f"{row.target}: perplexity {row.perplexity:.2f}, top-1 {100 * row.top1_accuracy:.1f}%, "
            f"agreement with reference {100 * row.token_agreement:.1f}% over {row.num_tokens} tokens"
        )
    reporter.update("done", 100, "evaluation finished")
    return rows




# --- the "evaluate" job kind --------------------------------------------------------------------


def _resolve_policies(engine, names: list[str], ckpt_dir: Path) -> list[Policy]:
    from storage.crud import find_policy
    from workbench.ckpt_format import read_flexquant_config
    from workbench.policy import parse_policy, policy_from_dict

    policies = []
    for name in names:
        if name == "default":
            policies.append(policy_from_dict(read_flexquant_config(ckpt_dir)["policy"]))
            continue
        row = find_policy(engine, name=name)
        if row is None:
            raise ValueError(f"no saved policy named {name!r}; save it first (flexquant policy save FILE)")
        policies.append(parse_policy(row.body_yaml))
    return policies


def validate_evaluate_params(params: dict, engine) -> dict:
    """Submit-time check: the checkpoint exists and is merged, policies exist, sizes are sane."""
    from storage.crud import find_checkpoint

    name = params.get("checkpoint")
    ckpt = find_checkpoint(engine, name=name) if name else None
    if ckpt is None:
        raise ValueError(f"no checkpoint named {name!r}; list them with `flexquant checkpoints` or the UI")
    if ckpt.kind != "merged":
        raise ValueError(f"checkpoint {name!r} is a {ckpt.kind} checkpoint; evaluation needs a merged one")
    out = {
        "checkpoint": name,
        "policies": list(params.get("policies") or ["default"]),
        "max_docs": int(params.get("max_docs", 20)),
        "seq_len": int(params.get("seq_len", 256)),
        "prefix_len": int(params.get("prefix_len", 32)),
        "decode_batch": int(params.get("decode_batch", 1)),
        "eval_path": params.get("eval_path"),
    }
    if not 1 <= out["max_docs"] <= 1000:
        raise ValueError("max_docs must be between 1 and 1000")
    if not 8 <= out["prefix_len"] < out["seq_len"] <= 4096:
        raise ValueError("need 8 <= prefix_len < seq_len <= 4096")
    _resolve_policies(engine, out["policies"], Path(ckpt.path))
    return out


@job_kind("evaluate", requeue_safe=True, validate=validate_evaluate_params)
def run_evaluate_job(ctx, params: dict) -> dict:
    """Evaluate a merged checkpoint against its source model; store one EvalResult row per target."""
    from storage.crud import find_checkpoint, find_source_model, insert_row
    from storage.models import EvalResult
    from workbench.textdata import dataset_name, eval_texts

    ckpt = find_checkpoint(ctx.engine, name=params["checkpoint"])
    source = find_source_model(ctx.engine, id=ckpt.source_model_id) if ckpt.source_model_id else None
    if source is None:
        ctx.log("the checkpoint's source model is not registered: BF16 reference skipped")
    eval_path = Path(params["eval_path"]) if params.get("eval_path") else None
    texts = eval_texts(eval_path, max_docs=params["max_docs"])
    rows = evaluate_checkpoint(
        Path(ckpt.path),
        Path(source.path) if source else None,
        texts,
        policies=_resolve_policies(ctx.engine, params["policies"], Path(ckpt.path)),
        seq_len=params["seq_len"],
        prefix_len=params["prefix_len"],
        decode_batch=params["decode_batch"],
        reporter=ctx,
    )
    dataset = dataset_name(eval_path, purpose="eval")
    for row in rows:
        insert_row(
            ctx.engine,
            EvalResult(
                checkpoint_id=ckpt.id,
                job_id=ctx.job_id,
                target=row.target,
                dataset=dataset,
                perplexity=row.perplexity,
                token_agreement=row.token_agreement,
                top1_accuracy=row.top1_accuracy,
                num_tokens=row.num_tokens,
            ),
            unique_name=False,
        )
    return {"dataset": dataset, "rows": [r.as_dict() for r in rows]}
