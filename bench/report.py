"""The report of ``edge-duet bench``: the ratios between jobs, the terminal table, the per-turn plot."""

from __future__ import annotations

from pathlib import Path


def speedups(summaries: list[dict], jobs: list[dict]) -> dict:
    """Baseline / edge-duet per-turn time at every report turn, for each (edge job, baseline or peer job) pair."""
    pairs = [(e, ej, b, bj) for e, ej in zip(summaries, jobs) for b, bj in zip(summaries, jobs)
             if e and b and ej["kind"] == "edge" and bj["kind"] in ("transformers", "peer")]
    out = {}
    for e, ej, b, bj in pairs:
        ratios = {t: b["at"][t]["total_s"] / e["at"][t]["total_s"] for t in e["at"] if t in b["at"]}
        if e.get("run_s") and b.get("run_s") and e.get("turns") == b.get("turns"):
            ratios["run"] = b["run_s"] / e["run_s"]  # the whole run: load + every turn
        out[f"{bj['name']} / {ej['name']}"] = ratios
    return out


def format_report(report: dict) -> str:
    """The terminal table: one column per job."""
    jobs, sums = report["jobs"], report["summaries"]
    names = [j["name"] for j in jobs]

    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f}"

    def num(x, f="{:.1f}"):
        return "-" if x is None else f.format(x)

    status = ["unavailable" if r.get("unavailable") else "failed" if r["error"] else "ok" for r in report["results"]]
    rows = [("status", status), ("load (s)", [num(s.get("load_s")) for s in sums]),
            ("vision / turn (ms)", [ms(s.get("vision_s")) for s in sums]),
            ("prefill / silent turn (ms)", [ms(s.get("prefill_s")) for s in sums]),
            ("  new tokens / achieved GFLOP/s", [f"{num(s.get('prefill_tokens'), '{:.0f}')} / "
                                                 f"{num(s.get('prefill_gflops'))}" for s in sums]),
            ("silent turn (ms)", [ms(s.get("silent_turn_s")) for s in sums]),
            ("  decoder calls (median / max)", [f"{num(s.get('silent_calls'), '{:.0f}')} / "
                                                f"{num(s.get('silent_calls_max'), '{:.0f}')}" for s in sums]),
            ("reply time to first token (ms)", [ms(s.get("ttft_s")) for s in sums]),
            ("decode tokens/s (all replies)", [num(s.get("decode_tok_s")) for s in sums]),
            ("  at the first reply (context)", [_first_decode(s) for s in sums]),
            ("  limit tokens/s (bandwidth/bytes)", [num(s.get("decode_limit_tok_s")) for s in sums]),
            ("  share of the limit", [num(s.get("decode_fraction_of_limit") and 100 * s["decode_fraction_of_limit"],
                                          "{:.0f} %") for s in sums])]
    turns = sorted({t for s in sums if s for t in s["at"]}, key=int)  # ints in a run, strings from its JSON
    for t in turns:
        rows.append((f"per turn at turn {t} (ms)", [ms(s["at"][t]["total_s"]) if s and t in s["at"] else "-"
                                                    for s in sums]))
    if turns:
        t = turns[-1]
        rows.append((f"  turn {t}: render/vision/prefill/decode/other", [
            "/".join(ms(s["at"][t].get(k) or 0) for k in ("render_s", "vision_s", "prefill_s", "decode_s", "other_s"))
            if s and t in s["at"] else "-" for s in sums]))
    rows += [("last / first report turn", [num(s.get("flat_ratio", {}).get("ratio"), "{:.2f}x") for s in sums]),
             ("evictions (n, re-prefill ms)", [f"{s.get('evictions', 0)}, {ms(s.get('evict_s'))}" if s else "-"
                                               for s in sums]),
             ("visual tokens dropped", [num(s.get("dropped_share") and 100 * s["dropped_share"], "{:.0f} %")
                                        for s in sums]),
             ("whole run: load + all turns (s)", [num(s.get("run_s")) for s in sums]),
             ("peak memory RSS (GB)", [num(s.get("peak_rss_gb"), "{:.2f}") for s in sums])]
    errors = [(j["name"], r["error"]) for j, r in zip(jobs, report["results"]) if r["error"]]
    missing = [(j["name"], r.get("unavailable")) for j, r in zip(jobs, report["results"]) if r.get("unavailable")]
    width = max(len(r[0]) for r in rows) + 2
    # each column as wide as its name or its widest cell, plus two spaces: cells never run into each other
    cols = [max(len(n), 10, *(len(vals[i]) for _, vals in rows)) + 2 for i, n in enumerate(names)]
    lines = ["".ljust(width) + "".join(n.rjust(c) for n, c in zip(names, cols))]
    lines += [label.ljust(width) + "".join(v.rjust(c) for v, c in zip(vals, cols)) for label, vals in rows]
    for pair, ratios in report["speedups"].items():
        lines.append(f"{pair}: " + ", ".join(f"{'turn ' + str(t) if t != 'run' else 'whole run'}: {r:.1f}x"
                                             for t, r in ratios.items()))
    m = report["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; copy bandwidth "
                 f"{m['bandwidth_gbs']:.1f} GB/s; float32 matmul {m['matmul_gflops']:.0f} GFLOP/s")
    lines += [f"{n}: unavailable: {why}" for n, why in missing]
    lines += [f"FAILED {n}: {e}" for n, e in errors]
    return "\n".join(lines)


def _first_decode(s: dict) -> str:
    first = (s or {}).get("decode_by_reply") or [None]
    return "-" if first[0] is None or first[0]["tok_s"] is None else f"{first[0]['tok_s']:.1f} ({first[0]['context']})"


def plot_turns(report: dict, path: str | Path) -> Path:
    """Per-turn latency against turn index, one line per job (log scale), reply turns marked; saved to ``path``."""
    from edge_duet.errors import require

    require("matplotlib", "plots", "The bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for job, res in zip(report["jobs"], report["results"]):
        recs = res["records"]
        if not recs:
            continue
        plain = [r for r in recs if r["kind"] == "silent" and not r.get("evict_s")]
        line, = ax.plot([r["turn"] for r in plain], [r["total_s"] for r in plain], lw=1.2, label=job["name"])
        for marker, sel in (("x", lambda r: r["kind"] == "reply"), ("^", lambda r: r.get("evict_s"))):
            pts = [r for r in recs if sel(r)]
            ax.plot([r["turn"] for r in pts], [r["total_s"] for r in pts], marker, ms=5, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("turn (2 frames each). Line: silent turns; x: a reply turn; ^: a turn that evicted old turns")
    ax.set_ylabel("turn latency (s)")
    t = report["target"]
    m = report["machine"]
    ax.set_title(f"{t['name']}: per-turn latency, {m['cores']}-core CPU, {m['threads']} thread(s) per job", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # the format from the suffix
    plt.close(fig)
    return Path(path)
