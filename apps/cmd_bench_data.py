"""`edge-duet make-benchmark`: write a synthetic proactive benchmark (videos, gold, frame-input file)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import eprint, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("make-benchmark")
    @handle_errors
    def make_benchmark(
        out_dir: Path = typer.Argument(..., help="Directory to write the benchmark into (created if missing)."),
        seed: int = typer.Option(0, "--seed", help="Split seed: the same seed gives byte-identical files."),
        examples: int = typer.Option(60, "--examples", help="Number of videos (subsets in rotation)."),
        frame_interval: float = typer.Option(1.0, "--frame-interval", help="Seconds between sampled frames."),
        frames_per_turn: int = typer.Option(2, "--frames-per-turn", help="Frames per user turn."),
        size: int = typer.Option(224, "--size", help="Video and frame side in pixels (square)."),
    ) -> None:
        """Render scenes of coloured shapes that appear, move, leave, change colour and get counted, with
        proactive dialogues in ProactiveVideoQA's format. Writes videos/*.mp4, frames/<id>/*.png, gold.json
        (for `edge-duet eval`), infer_input.json (for `edge-duet infer`; paths relative to OUT_DIR) and
        scenes.json (every object's timeline)."""
        from edge_duet.apps.outputs import check_dir
        from edge_duet.errors import UsageError
        from edge_duet.eval.benchmark import Clock, write_benchmark

        check_dir(out_dir, "OUT_DIR")
        if size < 56 or size % 2:
            raise UsageError(f"--size must be an even number of pixels >= 56, got {size}")
        out = write_benchmark(out_dir, seed, examples, Clock(frame_interval, frames_per_turn), size=size,
                              progress=True)
        eprint(f"wrote {examples} examples to {out} (gold.json, infer_input.json, videos/, frames/)")
