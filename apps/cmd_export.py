"""`edge-duet make-checkpoint` and `edge-duet export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import handle_errors


def register(app: typer.Typer) -> None:
    @app.command("make-checkpoint")
    @handle_errors
    def make_checkpoint_cmd(
        out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
        shape: str = typer.Option("tiny", help="Named shape: tiny, tiny-mha, tiny-deep, tiny-serve (vLLM), bench, perf, 3b, 7b."),
        seed: int = typer.Option(0, help="Random seed of the weights."),
        dtype: str = typer.Option("float32", help="Weight dtype on disk: float32 or bfloat16 (3b/7b: bfloat16 halves RAM)."),
        flat_config: bool = typer.Option(False, help="Write the flat hub-style config.json that Qwen2.5-VL-3B ships."),
        init_std: Optional[float] = typer.Option(None, help="Initializer std (default: the config's 0.02)."),
        hidden_size: Optional[int] = typer.Option(None, help="Override the text hidden size."),
        num_layers: Optional[int] = typer.Option(None, help="Override the number of decoder layers."),
        vision_depth: Optional[int] = typer.Option(None, help="Override the vision depth."),
    ):
        """Write a random-weight Qwen2.5-VL checkpoint with MMDuet2's file layout (for tests and benchmarks)."""
        from edge_duet.export.checkpoint import make_checkpoint, shape_from_name

        overrides = {k: v for k, v in dict(hidden_size=hidden_size, num_layers=num_layers,
                                            vision_depth=vision_depth).items() if v is not None}
        if vision_depth is not None:
            overrides["fullatt_block_indexes"] = (vision_depth - 1,)
        path = make_checkpoint(out_dir, shape_from_name(shape, **overrides), seed=seed, dtype=dtype,
                               flat_config=flat_config, init_std=init_std)
        typer.echo(f"wrote {shape} checkpoint to {path}")

    @app.command("export")
    @handle_errors
    def export_cmd(
        checkpoint: Path = typer.Argument(..., help="Local Hugging Face checkpoint directory (Qwen2.5-VL / MMDuet2)."),
        bundle: Path = typer.Argument(..., help="Bundle directory to create."),
        overwrite: bool = typer.Option(False, help="Replace an existing bundle."),
        validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare ONNX Runtime with PyTorch after export (default on)."),
        opset: int = typer.Option(18, help="ONNX opset."),
        system_prompt: Optional[str] = typer.Option(None, help="Default system prompt stored in the bundle."),
        max_context: Optional[int] = typer.Option(None, help="Default maximum context (tokens) stored in the bundle."),
        frame_interval: Optional[float] = typer.Option(None, help="Default seconds between frames."),
        frames_per_turn: Optional[int] = typer.Option(None, help="Default frames per user turn."),
        name: Optional[str] = typer.Option(None, help="Model name in the manifest (default: the checkpoint folder's name)."),
    ):
        """Export a checkpoint to an ONNX bundle (vision, embedding, decoder + tokenizer + manifest), validated."""
        from edge_duet.export.onnx_export import ExportOptions, export_bundle

        report = export_bundle(
            checkpoint, bundle,
            ExportOptions(opset=opset, validate=validate, overwrite=overwrite, system_prompt=system_prompt,
                          max_context_tokens=max_context, frame_interval_s=frame_interval,
                          frames_per_turn=frames_per_turn, name=name),
            log=lambda s: typer.echo(s, err=True),
        )
        typer.echo(report.summary())
