"""`edge-duet make-checkpoint`, `edge-duet export` and `edge-duet inspect`."""

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
        flat_config: bool = typer.Option(
            False, help="MMDuet2's published layout: the flat hub-style config.json and no proactive.json."),
        init_std: Optional[float] = typer.Option(None, help="Initializer std (default: the config's 0.02)."),
        hidden_size: Optional[int] = typer.Option(None, help="Override the text hidden size."),
        num_layers: Optional[int] = typer.Option(None, help="Override the number of decoder layers."),
        vision_depth: Optional[int] = typer.Option(None, help="Override the vision depth."),
        overwrite: bool = typer.Option(False, help="Replace a checkpoint already in OUT_DIR."),
    ):
        """Write a random-weight Qwen2.5-VL checkpoint with MMDuet2's file layout (for tests and benchmarks)."""
        from edge_duet.export.checkpoint import make_checkpoint, shape_from_name

        overrides = {k: v for k, v in dict(hidden_size=hidden_size, num_layers=num_layers,
                                            vision_depth=vision_depth).items() if v is not None}
        if vision_depth is not None:
            overrides["fullatt_block_indexes"] = (vision_depth - 1,)
        path = make_checkpoint(out_dir, shape_from_name(shape, **overrides), seed=seed, dtype=dtype,
                               flat_config=flat_config, init_std=init_std, overwrite=overwrite)
        typer.echo(f"wrote {shape} checkpoint to {path}")

    @app.command("export")
    @handle_errors
    def export_cmd(
        checkpoint: Path = typer.Argument(..., help="Local Hugging Face checkpoint directory (Qwen2.5-VL / MMDuet2)."),
        bundle: Path = typer.Argument(..., help="Bundle directory to create."),
        overwrite: bool = typer.Option(False, help="Replace an existing bundle."),
        validate: bool = typer.Option(True, "--validate/--no-validate", help="Compare ONNX Runtime with PyTorch after export (default on)."),
        fused: bool = typer.Option(True, "--fused/--no-fused", help="Also write decoder_fused.onnx, the CPU's faster decoder (ONNX Runtime's GroupQueryAttention over an in-place KV buffer; doubles the decoder's size on disk). Default on."),
        opset: int = typer.Option(18, help="ONNX opset."),
        system_prompt: Optional[str] = typer.Option(None, help="Default system prompt stored in the bundle."),
        max_context: Optional[int] = typer.Option(None, help="Default maximum context (tokens) stored in the bundle."),
        frame_interval: Optional[float] = typer.Option(None, help="Default seconds between frames."),
        frames_per_turn: Optional[int] = typer.Option(None, help="Default frames per user turn."),
        max_pixels: Optional[int] = typer.Option(
            None, help="Per-frame pixel budget (default: MMDuet2's ~128 visual tokens = 100352 px for a checkpoint "
                       "without proactive.json; 28*28 px per token)."),
        name: Optional[str] = typer.Option(None, help="Model name in the manifest (default: the checkpoint folder's name)."),
        quantize: Optional[str] = typer.Option(
            None, "--quantize", help="Write the bundle quantized with this recipe (cpu, jetson, int4, int8, fp16, ...: "
                                     "see `edge-duet quantize --help`); the float32 export is temporary."),
        dtype: str = typer.Option(
            "fp32", "--dtype", help="Weight type of the bundle: fp32, or fp16 (the same as --quantize fp16)."),
    ):
        """Export a checkpoint to an ONNX bundle (vision, embedding, decoder + tokenizer + manifest), validated."""
        from edge_duet.errors import UsageError
        from edge_duet.export.onnx_export import ExportOptions, export_bundle

        if dtype not in ("fp32", "fp16"):
            raise UsageError(f"--dtype {dtype!r}: use fp32 or fp16 (int8/int4 bundles: --quantize RECIPE)")
        if dtype == "fp16":
            if quantize not in (None, "fp16"):
                raise UsageError("--dtype fp16 and --quantize name two precisions; give one of them")
            quantize = "fp16"
        report = export_bundle(
            checkpoint, bundle,
            ExportOptions(opset=opset, validate=validate, overwrite=overwrite, system_prompt=system_prompt,
                          max_context_tokens=max_context, frame_interval_s=frame_interval,
                          frames_per_turn=frames_per_turn, max_pixels=max_pixels, name=name, quantize=quantize,
                          fused_decoder=fused),
            log=lambda s: typer.echo(s, err=True),
        )
        typer.echo(report.summary())

    @app.command("inspect")
    @handle_errors
    def inspect_cmd(
        path: Path = typer.Argument(..., help="A checkpoint directory or a bundle directory."),
        camera: str = typer.Option("640x480", "--camera-size", help="Frame size WxH to count tokens per turn for."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ):
        """What a bundle (or the bundle a checkpoint would export to) will do: prompt, frame budget, tokens per turn
        for a camera size, context budget, graphs, precisions, sizes. No weights are loaded."""
        import json as _json

        from edge_duet.apps.describe import describe, parse_size, render

        info = describe(path, parse_size(camera))
        typer.echo(_json.dumps(info, indent=2) if as_json else render(info))
