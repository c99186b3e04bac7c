"""`edge-duet eval GOLD.json PRED.jsonl`: PAUC, duplicate % and reply counts of a proactive model's replies."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edge_duet.apps.common import eprint, handle_errors


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


@handle_errors
def eval_command(
    gold: Path = typer.Argument(..., help="Gold answers: a ProactiveVideoQA JSON list (reply_timespan per answer)."),
    pred: Path = typer.Argument(..., help="Predictions: JSONL, {question_id, model_response_list} a line."),
    omega: float = typer.Option(
        0.5, "--omega", help="Timeliness weight in [0, 1]: 0 = reply times count fully, 1 = only the final content."
    ),
    judge: str = typer.Option(
        "overlap", "--judge", help="'overlap' (offline, deterministic) or 'openai:MODEL@http://host:port/v1'."
    ),
    subset: str = typer.Option("all", "--subset", help="Subset name for gold examples without a 'subset' field."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (every span, every reply)."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write one PNG per example into this folder."),
    baselines: bool = typer.Option(
        False, "--baselines", help="Also score the always-silent and the reply-every-turn baselines."
    ),
    turn_interval: Optional[float] = typer.Option(
        None, "--turn-interval", help="Seconds per turn, for --baselines when predictions hold no user entries (edge-duet infer writes one per turn)."
    ),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Judge cache file (default ~/.cache/edge-duet/)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the judge cache."),
    judge_timeout: float = typer.Option(60.0, "--judge-timeout", help="Seconds per LLM judge request."),
    judge_workers: int = typer.Option(4, "--judge-workers", help="Parallel LLM judge requests."),
) -> None:
    """Score replies with PAUC (ProactiveVideoQA): per subset and overall, with duplicate % and reply counts."""
    import json

    from edge_duet.apps.outputs import atomic_path, check_dir, check_file
    from edge_duet.eval.evaluator import evaluate, every_turn_predictions, silent_predictions
    from edge_duet.eval.formats import load_gold, load_predictions
    from edge_duet.eval.judge_cache import JudgeCache, default_cache_path
    from edge_duet.eval.judges import make_judge
    from edge_duet.eval.pauc import check_omega
    from edge_duet.eval.report import format_table, warnings

    check_omega(omega)
    if plots is not None:  # fail before judging, not after
        from edge_duet.errors import require

        require("matplotlib", "plots", "--plots")
    check_file(json_out, "--json", "report.json")
    check_dir(plots, "--plots")
    the_judge = make_judge(judge, timeout_s=judge_timeout, max_workers=judge_workers)
    gold_examples = load_gold(gold, default_subset=subset)
    predictions = load_predictions(pred)

    every_turn = every_turn_predictions(gold_examples, predictions, turn_interval) if baselines else None

    judge_cache = None
    if the_judge.cacheable and not no_cache:
        judge_cache = JudgeCache(cache if cache is not None else default_cache_path())
    try:
        report = evaluate(gold_examples, predictions, the_judge, omega, cache=judge_cache, progress=True)
        extra = {}
        if baselines:
            extra["silent"] = evaluate(gold_examples, silent_predictions(gold_examples), the_judge, omega)
            extra["every-turn"] = evaluate(
                gold_examples, every_turn, the_judge, omega, cache=judge_cache, progress=True
            )
    finally:
        if judge_cache is not None:
            judge_cache.close()

    typer.echo(format_table(report, extra))
    for w in warnings(report):
        eprint(f"warning: {w}")

    if json_out is not None:
        data = report.to_dict()
        if extra:
            data["baselines"] = {name: b.to_dict(details=False) for name, b in extra.items()}
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        eprint(f"report written to {json_out}")
    if plots is not None:
        from edge_duet.eval.plots import plot_report

        paths = plot_report(report, plots, progress=True)
        eprint(f"{len(paths)} plots written to {plots}")
