"""What an evaluation produces: per-span results, per-subset summaries, a JSON form and a plain-text table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from .formats import Reply
from .pauc import duplicate_percent, mean_pauc_percent


@dataclass(frozen=True)
class ScoredReply:
    time_s: float
    content: str
    # height of the step line from this reply on (the judge score of the accumulated replies); None: unparsed
    score: int | None
    duplicate: bool | None  # None for the first reply of a span (never a duplicate) and for unparsed judgements
    judge_raw: str = ""


@dataclass(frozen=True)
class SpanResult:
    answer_index: int
    span_s: tuple[float, float]
    answer: str
    replies: tuple[ScoredReply, ...]  # the replies inside the span, in time order
    pauc: float  # fraction in [0, 1]
    n_duplicates: int
    n_duplicate_candidates: int  # replies in the span after its first one
    n_unparsed: int  # judge answers that were neither a score nor yes/no


@dataclass(frozen=True)
class ExampleResult:
    question_id: str
    subset: str
    replies: tuple[Reply, ...]  # every reply of the example, in or out of spans
    spans: tuple[SpanResult, ...]
    n_replies_in_span: int  # replies inside at least one answer span
    duration_s: float | None = None
    has_prediction: bool = True

    @property
    def n_replies(self) -> int:
        return len(self.replies)


@dataclass(frozen=True)
class Summary:
    name: str
    n_examples: int
    n_spans: int
    pauc: float | None  # mean over spans, x100; None without spans
    duplicate_pct: float
    n_duplicates: int
    n_duplicate_candidates: int
    n_replies: int
    n_replies_in_span: int
    n_unparsed: int

    @property
    def n_replies_out_of_span(self) -> int:
        return self.n_replies - self.n_replies_in_span


def summarise(name: str, examples: Sequence[ExampleResult]) -> Summary:
    """Pooled over the spans of ``examples``: PAUC is the mean over spans, duplicates the pooled ratio."""
    spans = [s for ex in examples for s in ex.spans]
    n_dup = sum(s.n_duplicates for s in spans)
    n_cand = sum(s.n_duplicate_candidates for s in spans)
    return Summary(
        name=name,
        n_examples=len(examples),
        n_spans=len(spans),
        pauc=mean_pauc_percent([s.pauc for s in spans]),
        duplicate_pct=duplicate_percent(n_dup, n_cand),
        n_duplicates=n_dup,
        n_duplicate_candidates=n_cand,
        n_replies=sum(ex.n_replies for ex in examples),
        n_replies_in_span=sum(ex.n_replies_in_span for ex in examples),
        n_unparsed=sum(s.n_unparsed for s in spans),
    )


@dataclass(frozen=True)
class EvalReport:
    judge_id: str
    omega: float
    examples: tuple[ExampleResult, ...]
    subsets: tuple[Summary, ...]  # one per subset, sorted by name
    overall: Summary
    missing_predictions: tuple[str, ...] = ()  # gold question_ids without a prediction line (scored as silence)
    unmatched_predictions: tuple[str, ...] = ()  # prediction question_ids not in the gold file (ignored)

    @property
    def spans(self) -> list[SpanResult]:
        return [s for ex in self.examples for s in ex.spans]

    def subset(self, name: str) -> Summary:
        for s in self.subsets:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self, details: bool = True) -> dict:
        out = {
            "judge": self.judge_id,
            "omega": self.omega,
            "overall": _summary_dict(self.overall),
            "subsets": {s.name: _summary_dict(s) for s in self.subsets},
            "missing_predictions": list(self.missing_predictions),
            "unmatched_predictions": list(self.unmatched_predictions),
        }
        if details:
            out["examples"] = [
                {
                    "question_id": ex.question_id,
                    "subset": ex.subset,
                    "has_prediction": ex.has_prediction,
                    "n_replies": ex.n_replies,
                    "n_replies_in_span": ex.n_replies_in_span,
                    "spans": [
                        {
                            "answer_index": s.answer_index,
                            "reply_timespan": list(s.span_s),
                            "answer": s.answer,
                            "pauc": 100.0 * s.pauc,
                            "replies": [asdict(r) for r in s.replies],
                        }
                        for s in ex.spans
                    ],
                }
                for ex in self.examples
            ]
        return out


def _summary_dict(s: Summary) -> dict:
    d = asdict(s)
    d["n_replies_out_of_span"] = s.n_replies_out_of_span
    return d


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _aligned(title: str, header: list[str], rows: list[list[str]], tail: int = 1) -> list[str]:
    """A plain-text table: first column left-aligned, the others right-aligned, a rule above the last ``tail``
    rows."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return [title, line(header), rule] + [line(r) for r in rows[:-tail]] + [rule] + [line(r) for r in rows[-tail:]]


def format_table(report: EvalReport, baselines: Mapping[str, EvalReport] | None = None) -> str:
    """The summary as an aligned plain-text table, one row per subset and one for everything; with baselines, a
    second table with their PAUC per subset beside the model's, and every one's duplicate %."""
    summaries = list(report.subsets) + [report.overall]
    header = ["subset", "examples", "spans", "replies", "in span", "PAUC", "dup %"]
    rows = [[s.name, str(s.n_examples), str(s.n_spans), str(s.n_replies), str(s.n_replies_in_span),
             _fmt(s.pauc), _fmt(s.duplicate_pct)] for s in summaries]  # fmt: skip
    title = (
        f"PAUC x100 (omega={report.omega:g}, judge {report.judge_id}); "
        "dup % = duplicate replies / later replies in a span"
    )
    out = _aligned(title, header, rows)
    if baselines:
        header = ["subset", "model"] + list(baselines)
        rows = [[s.name, _fmt(s.pauc)] + [_fmt(b.overall.pauc if s is report.overall else b.subset(s.name).pauc)
                                          for b in baselines.values()] for s in summaries]  # fmt: skip
        rows.append(["dup %", _fmt(report.overall.duplicate_pct)] + [_fmt(b.overall.duplicate_pct)
                                                                     for b in baselines.values()])  # fmt: skip
        title = f"PAUC x100 of the model and the baselines (judge {report.judge_id}), and their duplicate %"
        out += [""] + _aligned(title, header, rows, tail=2)
    return "\n".join(out)


def warnings(report: EvalReport) -> list[str]:
    """Things a reader of the table must know: unparsed judge answers, examples without predictions."""
    out = []
    if report.overall.n_unparsed:
        out.append(
            f"the judge gave {report.overall.n_unparsed} answers it could not parse: those replies add no step to "
            "the PAUC line and are left out of the duplicate count (their raw text is in --json)"
        )
    if report.missing_predictions:
        shown = ", ".join(report.missing_predictions[:5]) + (" ..." if len(report.missing_predictions) > 5 else "")
        out.append(f"{len(report.missing_predictions)} gold examples have no prediction and count as silent: {shown}")
    if report.unmatched_predictions:
        shown = ", ".join(report.unmatched_predictions[:5]) + (" ..." if len(report.unmatched_predictions) > 5 else "")
        out.append(f"{len(report.unmatched_predictions)} predictions match no gold example and were ignored: {shown}")
    return out
