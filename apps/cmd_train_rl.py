"""`edge-duet train-rl`: MMDuet2's multi-turn GRPO on top of an SFT checkpoint (train/grpo.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import eprint, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("train-rl")
    @handle_errors
    def train_rl(
        out_checkpoint: Path = typer.Argument(..., help="Directory to write the RL checkpoint into."),
        sft: Path = typer.Option(None, "--sft", help="The SFT checkpoint to start from (e.g. made by train-demo); "
                                                     "copied into OUT_CHECKPOINT. Not needed with --resume."),
        resume: bool = typer.Option(False, "--resume", help="Continue OUT_CHECKPOINT from its last saved step "
                                                            "(training/rl_state.pt) up to --steps; every other "
                                                            "training option comes from the saved run."),
        steps: int = typer.Option(200, "--steps", help="Policy updates (each: --videos x --group rollouts)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the training videos and the sampling."),
        group: int = typer.Option(4, "--group", help="Rollouts per video (GRPO's group; the paper: 4)."),
        videos: int = typer.Option(1, "--videos", help="Videos per step."),
        lr: float = typer.Option(1e-6, "--lr", help="Learning rate, constant (the paper's 1e-6 is for 3B; the "
                                                    "2.5 M demo model uses 2e-5)."),
        temperature: float = typer.Option(1.2, "--temperature", help="Sampling temperature of the rollouts."),
        top_k: int = typer.Option(10, "--top-k", help="Sample among the k most likely tokens (0: all)."),
        max_new_tokens: int = typer.Option(100, "--max-new-tokens", help="Most tokens per assistant turn."),
        kl: float = typer.Option(0.0, "--kl", help="KL penalty to the SFT model (0: none, as the paper)."),
        w_pauc: float = typer.Option(3.0, "--w-pauc", help="Weight of the PAUC term."),
        w_rep: float = typer.Option(2.0, "--w-rep", help="Weight of the repetition penalty."),
        w_outspan: float = typer.Option(0.5, "--w-outspan", help="Weight of the out-of-span penalty."),
        w_pfx: float = typer.Option(2.0, "--w-pfx", help="Weight of the common-prefix penalty."),
        save_every: int = typer.Option(50, "--save-every", help="Steps between checkpoints."),
        eval_dialogues: int = typer.Option(0, "--eval-dialogues", help="Held-out dialogues scored greedily at the "
                                                                       "start, every --eval-every steps and the end."),
        eval_every: int = typer.Option(0, "--eval-every", help="Steps between evaluations (0: start and end only)."),
        threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
    ) -> None:
        """Multi-turn GRPO (MMDuet2's RL): each rollout is a whole dialogue sampled turn by turn over a generated
        video, a group of rollouts per video, group-normalised advantages of one reward per dialogue
        (3 PAUC + 2 repetition + 0.5 out-of-span + 2 common-prefix, judged by the strict offline judge).
        Writes a Hugging Face checkpoint (exportable as is) plus training/rl_log.json and training/rl_curve.png."""
        from edge_duet.apps.outputs import check_dir
        from edge_duet.errors import UsageError, require

        for module in ("torch", "transformers"):
            require(module, "export", "`edge-duet train-rl`")
        from edge_duet.eval.reward import RewardWeights
        from edge_duet.train.grpo import RLOptions, check_sft_checkpoint, train_rl

        if resume and sft is not None:
            raise UsageError("--resume continues OUT_CHECKPOINT from its own saved state: drop --sft")
        if not resume:
            if sft is None:
                raise UsageError("train-rl needs --sft SFT_CHECKPOINT (or --resume to continue OUT_CHECKPOINT)")
            check_sft_checkpoint(sft)
        check_dir(out_checkpoint, "OUT_CHECKPOINT")
        opts = RLOptions(
            steps=steps, seed=seed, group_size=group, videos_per_step=videos, lr=lr, temperature=temperature,
            top_k=top_k, max_new_tokens=max_new_tokens, kl_coef=kl, save_every=save_every,
            eval_dialogues=eval_dialogues, eval_every=eval_every, threads=threads,
            weights=RewardWeights(pauc=w_pauc, rep=w_rep, outspan=w_outspan, pfx=w_pfx),
        ).check()
        result = train_rl(sft, out_checkpoint, opts, resume=resume, log=eprint)
        last = result.history[-1] if result.history else {}
        eprint(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; checkpoint: {result.checkpoint}")
        if last:
            eprint(f"last step: reward {last['total']:.3f}, r_PAUC {last['pauc']:.3f}, loss {last['loss']:.4f}")
        if result.evals:
            e = result.evals[-1]
            eprint(f"held-out (greedy, strict judge): PAUC {e['strict_pauc']}, {e['replies']} replies, "
                   f"{e['replies_in_span']} in span")
