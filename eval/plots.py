"""One PNG per example: the time axis, the answer spans, the replies coloured by score, each span's PAUC step line.

matplotlib is optional (the ``plots`` extra) and imported only here, through the Agg canvas (no GUI, no pyplot
global state), so plotting works on a headless box and in threads.
"""

from __future__ import annotations

import re
from pathlib import Path

from edge_duet.errors import require

from .pauc import MAX_SCORE, step_line
from .report import EvalReport, ExampleResult

SCORE_COLOURS = {0: "#d62728", 1: "#ff7f0e", 2: "#2ca02c", None: "#7f7f7f"}  # red, orange, green, grey
SPAN_COLOUR = "#1f77b4"


def _safe_name(question_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", question_id).strip("._") or "example"


def plot_example(example: ExampleResult, path: Path, omega: float) -> Path:
    require("matplotlib", "plots", "--plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(10, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    end = max(
        [example.duration_s or 0.0] + [s.span_s[1] for s in example.spans] + [r.time_s for r in example.replies]
    )
    for span in example.spans:
        t0, t1 = span.span_s
        ax.axvspan(t0, t1, color=SPAN_COLOUR, alpha=0.10, lw=0)
        steps = step_line(span.span_s, [(r.time_s, r.score) for r in span.replies], omega)
        xs = [x for x, _ in steps] + [t1]
        ys = [y for _, y in steps] + [steps[-1][1]]
        ax.step(xs, ys, where="post", color=SPAN_COLOUR, lw=1.8)
        ax.text(t0, MAX_SCORE + 0.12, f"#{span.answer_index} PAUC {100 * span.pauc:.1f}", fontsize=7, va="bottom")

    # replies: a stem at each reply time, coloured by its score in the span it falls in (grey: out of every span)
    score_at: dict[int, int | None] = {}
    for span in example.spans:
        for r in span.replies:
            for i, reply in enumerate(example.replies):
                if reply.time_s == r.time_s and reply.content == r.content:
                    score_at[i] = r.score
    for i, reply in enumerate(example.replies):
        colour = SCORE_COLOURS[score_at[i]] if i in score_at else SCORE_COLOURS[None]
        ax.axvline(reply.time_s, ymin=0, ymax=0.06, color=colour, lw=2.5)
        ax.plot([reply.time_s], [score_at.get(i, -0.25)], "o", color=colour, ms=5)

    ax.set_xlim(0, end * 1.02 if end > 0 else 1.0)
    ax.set_ylim(-0.4, MAX_SCORE + 0.5)
    ax.set_yticks([0, 0.5, 1, 2])
    ax.set_xlabel("video time (s)")
    ax.set_ylabel("judge score")
    ax.set_title(f"{example.question_id} [{example.subset}]  omega={omega:g}", fontsize=9)
    legend = [Line2D([], [], color=c, marker="o", ls="", label=lab) for lab, c in
              (("score 2", SCORE_COLOURS[2]), ("score 1", SCORE_COLOURS[1]), ("score 0", SCORE_COLOURS[0]),
               ("out of span / unparsed", SCORE_COLOURS[None]))]  # fmt: skip
    legend.append(Line2D([], [], color=SPAN_COLOUR, label="PAUC step line (reply times shifted by omega)"))
    ax.legend(handles=legend, fontsize=7, loc="upper right", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_report(report: EvalReport, out_dir: str | Path, progress: bool = False) -> list[Path]:
    """One PNG per example of ``report`` into ``out_dir`` (created), named after the question_id."""
    require("matplotlib", "plots", "--plots")
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    paths = []
    for ex in tqdm(report.examples, desc="plots", unit="png", disable=not progress or len(report.examples) < 20):
        name = _safe_name(ex.question_id)
        stem, n = name, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        paths.append(plot_example(ex, out_dir / f"{name}.png", report.omega))
    return paths
