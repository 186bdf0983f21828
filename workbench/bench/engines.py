"""What a benchmark runs against: targets (stock baselines and FlexQuant) and their engine settings.

A `Target` is one engine start: a stock vLLM on a single-variant (or BF16) export — the baselines, so
the plugin's own cost is visible — or FlexQuant on the merged checkpoint, measured under one or
more policies switched live (one engine start for all of them). Every vLLM engine of a run gets the
same settings (`engine_config`): FlexQuant's compilation mode (no torch.compile, full CUDA graphs
for pure-decode batches), the same capture sizes, no prefix caching, the same context and batch
limits, so the ratios compare variants and policies, not settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from workbench import ckpt_format as fmt
from workbench.policy import Policy, fixed_policy, kernel_hints
from workbench.runtime.serve_config import ServeConfig
from workbench.runtime.vllm_launch import graph_compilation

__all__ = [
    "BASELINE_NAMES",
    "BenchSpec",
    "Target",
    "baseline_target",
    "engine_config",
    "hinted_kernel",
    "weight_memory_gib",
]

ONLINE_MAX_SEQS = 256  # vLLM's usual cap; online loads need room beyond the sweep's batches

# stock baseline name -> (variant, int4 kernel); the kernel is forced by disabling the other one.
BASELINE_NAMES = {
    "bf16": ("bf16", None),
    "w8a8": ("w8a8", None),
    "w4a16-machete": ("w4a16", "machete"),
    "w4a16-marlin": ("w4a16", "marlin"),
    "fp8": ("fp8", None),
}
DISABLE_OTHER_INT4 = {"marlin": "MacheteLinearKernel", "machete": "MarlinLinearKernel"}


@dataclass(frozen=True)
class BenchSpec:
    """The workload: a closed-batch sweep and an online Poisson load, the same for every target."""

    prompt_len: int = 1024
    output_len: int = 64
    batches: tuple[int, ...] = (1, 4, 16, 64, 128, 256)
    rates: tuple[float, ...] = (2.0, 8.0, 16.0)
    online_output_len: int = 128
    online_duration_s: float = 20.0
    repeats_small: int = 3  # closed batches <= 16 are short and noisy: take the median of this many
    repeats_large: int = 1  # closed batches > 16 (seconds each)
    warmup_s: float = 3.0  # load before each policy's measurements (first-request costs, idle GPU clocks)
    seed: int = 0
    runtime: str = "vllm"  # "vllm" | "cpu" (the CPU reference: tests and demos, no stock baselines)
    gpu_memory_utilization: float = 0.85
    # Prefill and mixed steps in vLLM's breakable CUDA graphs (attention eager, the rest replayed), in
    # every engine; off, they run op by op, and the host's launch time moved the batch-1 prefill of one
    # and the same W8A8 engine by up to 1.5x (docs/benchmarks/README.md, runs 6-8). Decode is in full
    # graphs either way.
    prefill_graphs: bool = True
    cpu_threads: int = 2
    port: int = 8100

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.prompt_len <= 32768, f"prompt length {self.prompt_len} must be 1..32768 tokens"),
            (
                2 <= self.output_len <= 4096,
                f"output length {self.output_len} must be 2..4096 (TPOT needs 2+)",
            ),
            (2 <= self.online_output_len <= 4096, "online output length must be 2..4096"),
            (all(1 <= b <= 1024 for b in self.batches), f"batch sizes {self.batches} must be 1..1024"),
            (all(r > 0 for r in self.rates), f"arrival rates {self.rates} must be > 0 requests/s"),
            (0 < self.online_duration_s <= 3600, "online duration must be 0..3600 s"),
            (self.runtime in ("vllm", "cpu"), f"runtime {self.runtime!r} must be 'vllm' or 'cpu'"),
            (self.repeats_small >= 1 and self.repeats_large >= 1, "repeats must be >= 1"),
            (0 <= self.warmup_s <= 600, f"warm-up {self.warmup_s} s must be 0..600 s"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bench spec: {message}")

    @property
    def max_batch(self) -> int:
        return max(self.batches) if self.batches else 1

    @property
    def engine_max_batch(self) -> int:
        """Requests an engine may run at once, and its largest decode graph: the sweep's largest batch,
        and at least ONLINE_MAX_SEQS when online loads run -- their requests in flight are not bounded
        by the sweep (24 req/s keeps ~30 in flight; an engine capped at a sweep's 16 queued them, TTFT
        p50 3.1 s instead of 63 ms: run 11, docs/benchmarks/README.md)."""
        return max(self.max_batch, ONLINE_MAX_SEQS if self.rates else 16)

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + max(self.output_len, self.online_output_len) + 16


@dataclass
class Target:
    """One engine start. `variant`/`kernel` name what a baseline runs (for auto-tuning and labels)."""

    label: str
    kind: str  # "stock" | "flex"
    checkpoint: Path
    variant: str | None = None
    kernel: str | None = None
    policies: list[Policy] = field(default_factory=list)
    auto_policy: bool = False  # flex: measure the policy tuned from this run's stock sweep first
    control_of: str | None = None  # a repeat of this baseline label, measured after FlexQuant

    def measurement_labels(self) -> list[str]:
        if self.kind == "stock":
            return [self.label]
        return [f"{self.label}:{p.name}" for p in self.policies] + (
            [f"{self.label}:auto"] if self.auto_policy else []
        )


def baseline_target(name: str, checkpoint: Path) -> Target:
    """A stock baseline from `NAME=DIR` (NAME in BASELINE_NAMES); ValueError naming the choices."""
    if name not in BASELINE_NAMES:
        raise ValueError(
            f"unknown baseline {name!r}; choose from {sorted(BASELINE_NAMES)} "
            "(e.g. --baseline w4a16-marlin=/path/to/w4a16-export)"
        )
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(
            f"baseline {name}: {checkpoint} has no config.json; give an exported checkpoint folder"
        )
    qcfg = fmt.read_config(checkpoint).get("quantization_config") or {}
    if qcfg.get("quant_method") == fmt.QUANT_METHOD:
        raise ValueError(
            f"baseline {name}: {checkpoint} is a merged FlexQuant checkpoint; stock vLLM needs a "
            "single-variant export (flexquant export, or flexquant synth --layouts w8a8,w4a16,bf16)"
        )
    variant, kernel = BASELINE_NAMES[name]
    return Target(label=name, kind="stock", checkpoint=checkpoint, variant=variant, kernel=kernel)


def control_target(baseline: Target) -> Target:
    """The engine-order control: `baseline` measured again after every other target, so a drift of
    the machine between the first and the last engine shows (and goals use the faster measurement)."""
    if baseline.control_of is not None:
        raise ValueError(f"{baseline.label} is already a control")
    return replace(baseline, label=f"{baseline.label}-control", control_of=baseline.label)


def engine_config(target: Target, spec: BenchSpec, policy: Policy, port: int) -> ServeConfig:
    """The ServeConfig that starts `target` for `spec` (same engine settings for every target)."""
    env: dict[str, str] = {}
    kernels = None
    if target.kind == "stock" and target.kernel:
        env["VLLM_DISABLED_KERNELS"] = DISABLE_OTHER_INT4[target.kernel]
    elif target.kind == "flex" and target.kernel:
        kernels = {"w4a16": target.kernel}
    return ServeConfig(
        checkpoint=Path(target.checkpoint),
        policy=policy
        if target.kind == "flex"
        else fixed_policy(re.sub(r"[^a-z0-9_]", "_", target.variant or "x")),
        port=port,
        runtime=spec.runtime,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        cpu_threads=spec.cpu_threads,
        served_model_name="bench",
        stock=target.kind == "stock",
        kernels=kernels,
        compilation_config=graph_compilation(spec.prefill_graphs, spec.engine_max_batch),
        max_num_seqs=spec.engine_max_batch,
        max_model_len=spec.max_model_len,
        extra_args=("--no-enable-prefix-caching",),
        extra_env=env or None,
    )


_LOADED = re.compile(r"Model loading took ([0-9.]+) GiB")


def weight_memory_gib(log_text: str) -> float | None:
    """GPU memory vLLM reports for the loaded weights ("Model loading took X GiB"), None if absent."""
    found = _LOADED.findall(log_text or "")
    return float(found[-1]) if found else None


def hinted_kernel(policies: list[Policy]) -> str | None:
    """The int4 kernel the policies name for W4A16 (None if none); PolicyError if they disagree."""
    return kernel_hints(*policies).get("w4a16")


def with_policies(target: Target, policies: list[Policy], kernel: str | None) -> Target:
    """A copy of a flex target that measures `policies` first and runs the int4 kernel `kernel`."""
    return replace(
        target, policies=[*policies, *target.policies], kernel=target.kernel or kernel, auto_policy=False
    )
