"""`edge-duet train-demo`: train the small demo model on the synthetic benchmark's dialogues."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import eprint, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("train-demo")
    @handle_errors
    def train_demo(
        out_checkpoint: Path = typer.Argument(..., help="Directory to write the trained checkpoint into."),
        minutes: float = typer.Option(45.0, "--minutes", help="Training time budget (evaluation not counted)."),
        steps: int = typer.Option(0, "--steps", help="Train exactly this many steps instead of a time budget "
                                                     "(reproducible whatever the machine's load)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the initial weights and the training data."),
        init_from: Path = typer.Option(None, "--init-from", help="Continue training this checkpoint (made by "
                                                                 "train-demo) instead of starting from scratch."),
        shape: str = typer.Option("demo", "--shape", help="'demo' (2.5 M parameters) or a test shape, e.g. 'tiny'."),
        batch_size: int = typer.Option(4, "--batch-size", help="Dialogues per step."),
        lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (60 warm-up steps, cosine to 10 %)."),
        eval_dialogues: int = typer.Option(8, "--eval-dialogues",
                                           help="Held-out dialogues scored greedily every quarter (0: none)."),
        threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
    ) -> None:
        """Train the demo model (a real Qwen2_5_VLForConditionalGeneration) from scratch: supervised multi-turn
        dialogues with NO REPLY turns, generated from the benchmark's scene generator. Writes a Hugging Face
        checkpoint directory with tokenizer, preprocessor and proactive.json, plus training/loss.png."""
        from edge_duet.apps.outputs import check_dir
        from edge_duet.errors import UsageError, require

        for module in ("torch", "transformers"):
            require(module, "export", "`edge-duet train-demo`")
        from edge_duet.train.sft import TrainOptions, train

        if minutes <= 0:
            raise UsageError(f"--minutes must be positive, got {minutes}")
        if steps < 0:
            raise UsageError(f"--steps must be >= 0, got {steps}")
        if init_from is not None and not (init_from / "config.json").is_file():
            raise UsageError(f"--init-from {init_from} is not a checkpoint directory (no config.json)")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        check_dir(out_checkpoint, "OUT_CHECKPOINT")
        opts = TrainOptions(minutes=minutes, steps=steps, init_from=init_from, seed=seed, shape=shape, lr=lr,
                            batch_size=batch_size, eval_dialogues=eval_dialogues, threads=threads)
        result = train(out_checkpoint, opts, log=eprint)
        last = result.evals[-1] if result.evals else {}
        eprint(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; checkpoint: {result.checkpoint}")
        if last:
            eprint(f"held-out turns: precision {last['precision']}, recall {last['recall']}, exact {last['exact']}")
