"""How ``edge-duet compare`` shows its report: the A/B table and the plot (compare.py computes the report)."""

from __future__ import annotations

import math
from pathlib import Path

from .compare import CompareReport


def _fmt(v, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(r: CompareReport) -> str:
    a, b, p, d = r.a, r.b, r.probe, r.decisions

    def delta(x, y, spec=".2f", pct=False):
        if x is None or y is None:
            return "-"
        if pct and x:
            return f"{100 * (y - x) / x:+.0f}%"
        return format(y - x, "+" + spec)

    rows = [
        ("variant", a["variant"], b["variant"], ""),
        ("size on disk (MiB)", _fmt(a["size_mib"]), _fmt(b["size_mib"]), delta(a["size_mib"], b["size_mib"], pct=True)),
        ("peak RSS (MiB)", _fmt(a["peak_rss_mib"], ".0f"), _fmt(b["peak_rss_mib"], ".0f"),
         delta(a["peak_rss_mib"], b["peak_rss_mib"], pct=True)),
        ("load (s)", _fmt(a["load_s"]), _fmt(b["load_s"]), delta(a["load_s"], b["load_s"])),
        ("per-turn latency median (ms)", _fmt(a["turn_ms_median"], ".0f"), _fmt(b["turn_ms_median"], ".0f"),
         delta(a["turn_ms_median"], b["turn_ms_median"], pct=True)),
        ("per-turn latency p90 (ms)", _fmt(a["turn_ms_p90"], ".0f"), _fmt(b["turn_ms_p90"], ".0f"),
         delta(a["turn_ms_p90"], b["turn_ms_p90"], pct=True)),
        ("decode steps/s (median turn)", _fmt(a["decode_tok_s"], ".1f"), _fmt(b["decode_tok_s"], ".1f"),
         delta(a["decode_tok_s"], b["decode_tok_s"], pct=True)),
        ("replies / turns", f"{a['replies']}/{a['turns']}", f"{b['replies']}/{b['turns']}", ""),
        ("probe logits cosine mean / min", "", f"{p['logits_cosine']:.4f} / {p['logits_cosine_min']:.4f}", ""),
        ("probe max |dlogit|", "", f"{p['max_abs_diff']:.3g}", ""),
        ("greedy token agreement (B fed A's tokens)", "", f"{p['argmax_agree']:.1%} of {p['positions']}", ""),
        ("reply/silence decision agreement", "", f"{_fmt(d['agreement'], '.1%')} ({d['agree']}/{d['turns']} turns)", ""),
        ("  A reply, B silent / A silent, B reply", "", f"{d['confusion_a_b'].get('reply/silence', 0)} / "
                                                       f"{d['confusion_a_b'].get('silence/reply', 0)}", ""),
        ("same reply text (turns both reply)", "", f"{_fmt(d['reply_text_agreement'], '.1%')} of {d['both_reply']}", ""),
    ]
    if r.benchmark:
        o = r.benchmark["overall"]
        rows += [(f"PAUC ({r.benchmark['examples']} examples, {o['spans']} spans)", _fmt(o["pauc_a"]), _fmt(o["pauc_b"]),
                  delta(o["pauc_a"], o["pauc_b"])),
                 ("duplicate %", _fmt(o["duplicate_pct_a"], ".1f"), _fmt(o["duplicate_pct_b"], ".1f"),
                  delta(o["duplicate_pct_a"], o["duplicate_pct_b"], ".1f"))]
    w = [max(len(str(row[i])) for row in rows + [("metric", "A", "B", "B - A")]) for i in range(4)]
    lines = [f"A: {a['bundle']}", f"B: {b['bundle']}", ""]
    for row in [("metric", "A", "B", "B - A")] + rows:
        lines.append("  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(row)))
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def plot_report(r: CompareReport, path: str | Path) -> Path:
    from edge_duet.errors import require

    require("matplotlib", "plots", "--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qids = list(dict.fromkeys(row["question_id"] for row in r.per_turn))
    fig, axes = plt.subplots(1, 3, figsize=(15, max(4.2, min(14.0, 0.16 * len(qids)))),
                             gridspec_kw={"width_ratios": [2.2, 1, 1.4]})
    ax = axes[0]
    for y, q in enumerate(qids):
        rows = [row for row in r.per_turn if row["question_id"] == q]
        for row in rows:
            for dy, key, colour in ((0.15, "a", "tab:blue"), (-0.15, "b", "tab:orange")):
                if row[key] == "reply":
                    ax.plot(row["time_s"], y + dy, "o", color=colour, ms=5)
                else:  # silence: a small tick, so every turn shows
                    ax.plot(row["time_s"], y + dy, "|", color="0.6", ms=4)
            if row["a"] != row["b"]:
                # axes fraction of this row's band (y - 0.35 .. y + 0.35) under ylim (-0.6, n - 0.4)
                ax.axvline(row["time_s"], ymin=(y + 0.25) / len(qids), ymax=(y + 0.95) / len(qids), color="red",
                           alpha=0.4, lw=3)
    every = max(1, len(qids) // 30)
    ax.set_yticks(range(0, len(qids), every), [q[-18:] for q in qids[::every]], fontsize=7)
    ax.set_ylim(-0.6, len(qids) - 0.4)
    ax.set_xlabel("video time (s)")
    ax.set_title(f"replies (dots) and silences (ticks): A above, B below; red: decisions differ "
                 f"({_fmt(r.decisions['agreement'], '.0%')} agree)", fontsize=9)
    axes[1].boxplot([r.a["turn_ms"], r.b["turn_ms"]])
    axes[1].set_xticks([1, 2], ["A", "B"])
    axes[1].set_ylabel("per-turn latency (ms)")
    axes[1].set_title(f"size {r.a['size_mib']:.0f} -> {r.b['size_mib']:.0f} MiB", fontsize=9)
    axes[2].plot(r.probe["per_position_cosine"], ".-")
    axes[2].set_xlabel("probe position (B fed A's tokens)")
    axes[2].set_ylabel("logits cosine")
    axes[2].set_title(f"greedy agreement {r.probe['argmax_agree']:.0%}", fontsize=9)
    fig.suptitle(f"{r.a['variant']} (A) vs {r.b['variant']} (B)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
