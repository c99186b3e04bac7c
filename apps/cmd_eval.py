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
        "strict",
        "--judge",
        help="'strict' (offline, fact by fact), 'overlap' (offline, word overlap: the old default) or "
        "'openai:MODEL@http://host:port/v1'; comma-separated for several (strict,overlap): a table each.",
    ),
    subset: str = typer.Option("all", "--subset", help="Subset name for gold examples without a 'subset' field."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (every span, every reply)."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write one PNG per example into this folder."),
    baselines: bool = typer.Option(
        False,
        "--baselines",
        help="Also score the baselines: always silent, reply every turn, and with the benchmark's frames "
        "(--frames) the OpenCV colour/contour pipeline and the gold oracle.",
    ),
    frames: Optional[Path] = typer.Option(
        None,
        "--frames",
        help="The infer input with the benchmark's frames, for the opencv and oracle baselines "
        "(default: infer_input.json beside GOLD).",
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
    from edge_duet.eval import baselines as bl
    from edge_duet.eval.evaluator import evaluate
    from edge_duet.eval.formats import load_gold, load_predictions
    from edge_duet.eval.judge_cache import JudgeCache, default_cache_path
    from edge_duet.eval.judges import make_judges
    from edge_duet.eval.pauc import check_omega
    from edge_duet.eval.report import format_table, warnings

    check_omega(omega)
    if plots is not None:  # fail before judging, not after
        from edge_duet.errors import require

        require("matplotlib", "plots", "--plots")
    check_file(json_out, "--json", "report.json")
    check_dir(plots, "--plots")
    judges = make_judges(judge, timeout_s=judge_timeout, max_workers=judge_workers)
    gold_examples = load_gold(gold, default_subset=subset)
    predictions = load_predictions(pred)

    others = {}  # baseline name -> predictions
    if baselines:
        others["silent"] = bl.silent_predictions(gold_examples)
        others["every-turn"] = bl.every_turn_predictions(gold_examples, predictions, turn_interval)
        frames_file = frames if frames is not None else gold.parent / "infer_input.json"
        if frames is not None or frames_file.is_file():
            from edge_duet.runtime.infer import load_examples

            streams = {ex.question_id: ex for ex in load_examples(frames_file)}
            others["opencv"] = bl.opencv_predictions(gold_examples, streams, progress=True)
            others["oracle"] = bl.oracle_predictions(gold_examples, streams)
        else:
            eprint(f"note: no {frames_file}: the opencv and oracle baselines need the benchmark's frames (--frames)")

    reports = []  # (report, {baseline: report}) per judge, the first judge's first
    for the_judge in judges:
        judge_cache = None
        if the_judge.cacheable and not no_cache:
            judge_cache = JudgeCache(cache if cache is not None else default_cache_path())
        try:
            report = evaluate(gold_examples, predictions, the_judge, omega, cache=judge_cache, progress=True)
            extra = {name: evaluate(gold_examples, p, the_judge, omega, cache=judge_cache, progress=True)
                     for name, p in others.items()}  # fmt: skip
        finally:
            if judge_cache is not None:
                judge_cache.close()
        reports.append((report, extra))

    typer.echo("\n\n".join(format_table(report, extra) for report, extra in reports))
    for w in warnings(reports[0][0]):
        eprint(f"warning: {w}")

    if json_out is not None:
        data = _report_json(*reports[0], details=True)
        if len(reports) > 1:
            data["other_judges"] = {r.judge_id: _report_json(r, extra, details=False) for r, extra in reports[1:]}
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        eprint(f"report written to {json_out}")
    if plots is not None:
        from edge_duet.eval.plots import plot_report

        paths = plot_report(reports[0][0], plots, progress=True)
        eprint(f"{len(paths)} plots written to {plots}")


def _report_json(report, baselines: dict, details: bool) -> dict:
    """A report as JSON (every span and reply when ``details``), with its baselines' summaries."""
    data = report.to_dict(details=details)
    if baselines:
        data["baselines"] = {name: b.to_dict(details=False) for name, b in baselines.items()}
    return data
