"""`flexquant synth`: a synthetic checkpoint set (real shapes, random weights) for speed runs.

    flexquant synth --shapes llama3-8b --out DIR [--layouts bf16,w8a8,w4a16,merged] [--device cuda]

Writes `DIR/<shapes>-<layout>` for each layout in one pass over the layers (see
`workbench.quant.synthetic.make_synthetic_set`). torch is imported only when the command runs, so
registering it keeps `flexquant --help` fast; nothing here imports gradio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from jobs.progress import Reporter
from workbench.cli_common import (
    console,
    human_bytes,
    import_backend,
    make_progress,
    print_fields,
)

DEFAULT_LAYOUTS = "bf16,w8a8,w4a16,merged"


def synth(
    shapes: Annotated[
        str, typer.Option("--shapes", help="Model shapes, e.g. llama3-8b, qwen2-7b, smollm2-135m.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder that receives one <shapes>-<layout> folder per layout.")
    ],
    layouts: Annotated[
        str,
        typer.Option("--layouts", help="Comma-separated: bf16, w8a8, w4a16, fp8 (one variant each), merged."),
    ] = DEFAULT_LAYOUTS,
    device: Annotated[
        str, typer.Option("--device", help="Where weights are drawn and quantized: cpu or cuda.")
    ] = "cpu",
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed (a CUDA draw differs from a CPU one).")
    ] = 0,
    group_size: Annotated[
        int, typer.Option("--group-size", help="W4A16 group size (lowered to fit the shapes).")
    ] = 128,
    tokenizer: Annotated[
        str,
        typer.Option(
            "--tokenizer", help="'wordlevel' (one word per id), 'none', or a folder of tokenizer files."
        ),
    ] = "wordlevel",
) -> None:
    """Write BF16, single-variant and merged checkpoints with real shapes and random weights."""
    synthetic = import_backend("workbench.quant.synthetic", "synth")
    names = [name.strip() for name in layouts.split(",") if name.strip()]
    tok: str | Path | None = (
        None if tokenizer == "none" else tokenizer if tokenizer == "wordlevel" else Path(tokenizer)
    )
    reporter = _BarOnFirstUpdate()
    try:
        paths = synthetic.make_synthetic_set(
            out,
            shapes=shapes,
            layouts=names,
            device=device,
            seed=seed,
            tokenizer=tok,
            w4a16_group_size=group_size,
            reporter=reporter,
        )
    finally:
        reporter.close()
    print_fields(
        [(layout, f"{path}  ({human_bytes(_folder_bytes(path))})") for layout, path in paths.items()]
    )
    console.print(f"[green]wrote {len(paths)} checkpoint(s) with {escape(shapes)} shapes[/green]")


class _BarOnFirstUpdate(Reporter):
    """A rich progress bar that appears with the first update, so a bad argument prints alone."""

    def __init__(self):
        super().__init__()
        self.progress = None

    def on_update(self, stage: str, percent: float, message: str, eta_s: float | None) -> None:
        if self.progress is None:
            self.progress = make_progress()
            self.progress.start()
            self.task = self.progress.add_task("", total=100)
        self.progress.update(self.task, completed=percent, description=escape(f"{stage}: {message}"))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def register(app: typer.Typer) -> None:
    """Add `synth` to the root `flexquant` app."""
    app.command("synth")(synth)
