"""`edge-duet quantize`, `edge-duet compare` and `edge-duet build-engines` (docs/quantization.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edge_duet.quant.recipes import PRECISIONS, PRESETS

from .common import eprint, handle_errors
from .outputs import atomic_path, check_file


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
    app.command("compare")(compare_command)
    app.command("build-engines")(build_engines_command)


@handle_errors
def quantize_command(
    bundle: Path = typer.Argument(..., help="Source bundle (the fp32 one `edge-duet export` wrote)."),
    out: Path = typer.Argument(..., help="New bundle directory to write."),
    recipe: str = typer.Option(
        ..., "--recipe", "-r",
        help=f"A preset ({', '.join(PRESETS)}) or per-graph precisions, e.g. "
             f"'vision=fp16,embed=fp32,decoder=int4,lm_head=fp32' ({' '.join(PRECISIONS)})."),
    block_size: int = typer.Option(32, "--block-size", help="Block size of w8/int4 weights (16-256, power of 2)."),
    accuracy_level: int = typer.Option(
        4, "--accuracy-level", help="MatMulNBits compute on CPU: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="Block quantization with zero points."),
    per_channel: bool = typer.Option(False, "--per-channel", help="int8: one scale per output channel."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare a probe turn with the source (default on)."),
):
    """Write a quantized copy of a bundle; every graph is checked for what its quantizer actually changed."""
    from edge_duet.quant.quantize import QuantOptions, quantize_bundle

    report = quantize_bundle(
        bundle, out, recipe,
        QuantOptions(block_size=block_size, accuracy_level=accuracy_level, symmetric=not asymmetric,
                     per_channel=per_channel, overwrite=overwrite, check=check),
        log=eprint,
    )
    typer.echo(report.summary())


@handle_errors
def compare_command(
    bundle_a: Path = typer.Argument(..., help="Reference bundle (usually fp32)."),
    bundle_b: Path = typer.Argument(..., help="Variant bundle (a quantized copy of A)."),
    benchmark: Optional[Path] = typer.Option(
        None, "--benchmark", help="Benchmark directory (infer_input.json, gold.json): its dialogues, and PAUC."),
    turns: Optional[int] = typer.Option(None, "--turns", help="Turns per dialogue (generated: 10; benchmark: all)."),
    dialogues: Optional[int] = typer.Option(
        None, "--dialogues", help="Generated dialogues (default 3) or benchmark examples (default all)."),
    probe_turns: int = typer.Option(3, "--probe-turns", help="Turns of the teacher-forced logits probe."),
    probe_tokens: int = typer.Option(12, "--probe-tokens", help="Forced tokens per probe turn."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Longest reply in the dialogues."),
    providers: Optional[str] = typer.Option(None, "--providers", help="cpu, cuda or tensorrt."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: decisions, latency, logits agreement."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON ('-': stdout)."),
    isolate: bool = typer.Option(
        True, "--isolate/--no-isolate", help="Measure each bundle in its own process (peak RSS per bundle)."),
):
    """Accuracy and cost of bundle B against bundle A: logits, greedy tokens, reply/silence decisions per
    turn, PAUC on a benchmark, size, memory and per-turn latency."""
    from edge_duet.quant.compare import CompareOptions, compare_bundles
    from edge_duet.quant.compare_table import format_table, plot_report

    if plot is not None:
        from edge_duet.errors import require

        require("matplotlib", "plots", "--plot")
        check_file(plot, "--plot", "compare.png")
    if json_out is not None and str(json_out) != "-":
        check_file(json_out, "--json", "compare.json")
    report = compare_bundles(
        bundle_a, bundle_b, benchmark,
        CompareOptions(dialogues=dialogues, turns=turns, probe_turns=probe_turns, probe_tokens=probe_tokens,
                       max_new_tokens=max_new_tokens, providers=providers, threads=threads, isolate=isolate),
        log=eprint,
    )
    data = json.dumps(report.to_dict(), indent=1, default=str)
    if json_out is not None and str(json_out) == "-":
        typer.echo(data)
    else:
        typer.echo(format_table(report))
        if json_out is not None:
            with atomic_path(json_out) as tmp:
                tmp.write_text(data + "\n")
    if plot is not None:
        with atomic_path(plot) as tmp:
            plot_report(report, tmp)
        eprint(f"plot: {plot}")


@handle_errors
def build_engines_command(
    bundle: Path = typer.Argument(..., help="Bundle with plain-op graphs (fp32 or fp16 recipe)."),
    precision: str = typer.Option("fp16", "--precision", help="fp32, fp16, or int8 (graphs with Q/DQ nodes)."),
    graphs: str = typer.Option("vision,embed,decoder", "--graphs", help="Graphs to build, comma-separated."),
    builder: str = typer.Option("tensorrt", "--builder", help="tensorrt (Python API) or ort (ORT's TensorRT EP)."),
    profiles: str = typer.Option("single", "--profiles", help="single (what ORT runs) or split (decode+prefill)."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Largest context (default: the bundle's)."),
    workspace_gib: float = typer.Option(2.0, "--workspace-gib", help="TensorRT builder workspace."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild engines that are still up to date."),
    device_id: int = typer.Option(0, "--device-id", help="CUDA device."),
):
    """Build TensorRT engines beside a bundle and list them in its manifest (run on the target device)."""
    from edge_duet.quant.engines import EngineOptions, build_engines

    report = build_engines(
        bundle,
        EngineOptions(precision=precision, graphs=tuple(g.strip() for g in graphs.split(",") if g.strip()),
                      builder=builder, profiles=profiles, max_context_tokens=max_context,
                      workspace_gib=workspace_gib, rebuild=rebuild, device_id=device_id),
        log=eprint,
    )
    typer.echo(f"engines of {bundle}:\n{report.summary()}")
