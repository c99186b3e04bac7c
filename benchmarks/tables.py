"""Markdown tables for docs/performance.md from an `edge-duet bench` report: python benchmarks/tables.py REPORT.json"""

from __future__ import annotations

import json
import sys


def ms(x):
    return "-" if x is None else f"{x * 1000:,.0f}"


def num(x, f="{:.1f}"):
    return "-" if x is None else f.format(x)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def main(path: str) -> None:
    r = json.load(open(path))
    names = [j["name"] for j in r["jobs"]]
    sums = r["summaries"]
    turns = sorted({int(t) for s in sums for t in s["at"]})
    rows = [
        ["vision per turn (ms)"] + [ms(s["vision_s"]) for s in sums],
        ["prefill per silent turn (ms)"] + [ms(s["prefill_s"]) for s in sums],
        ["new tokens in that prefill"] + [num(s["prefill_tokens"], "{:.0f}") for s in sums],
        ["prefill GFLOP/s achieved"] + [num(s["prefill_gflops"]) for s in sums],
        ["silent turn, whole (ms)"] + [ms(s["silent_turn_s"]) for s in sums],
        ["decoder calls per silent turn"] + [f"{s['silent_calls']:.0f} ({100 * s['silent_one_call_share']:.0f} % "
                                             "of them one call)" if s["silent_calls"] == 1 else
                                             f"{s['silent_calls']:.0f}" for s in sums],
        ["reply time to first token (ms)"] + [ms(s["ttft_s"]) for s in sums],
        ["decode tokens/s, all replies"] + [num(s["decode_tok_s"]) for s in sums],
        ["decode tokens/s, first reply (context)"] + [
            f"{s['decode_by_reply'][0]['tok_s']:.1f} ({s['decode_by_reply'][0]['context']})" for s in sums],
        ["decoder weight bytes / token (MB)"] + [num(s["decode_bytes_per_token"] / 1e6, "{:.0f}") for s in sums],
        ["limit: bandwidth / bytes (tokens/s)"] + [num(s["decode_limit_tok_s"]) for s in sums],
        ["share of the limit, all / first reply"] + [
            f"{100 * s['decode_fraction_of_limit']:.0f} % / "
            f"{100 * s['decode_by_reply'][0]['tok_s'] / s['decode_limit_tok_s']:.0f} %" for s in sums],
        ["evictions (median re-prefill ms)"] + [f"{s['evictions']} ({ms(s['evict_s'])})" for s in sums],
        ["visual tokens dropped"] + [num(s["dropped_share"] and 100 * s["dropped_share"], "{:.0f} %") for s in sums],
        ["whole run: load + every turn (s)"] + [num(s.get("run_s")) for s in sums],
        ["peak memory RSS (GB)"] + [num(s["peak_rss_gb"], "{:.2f}") for s in sums],
    ]
    print(table(["", *names], rows))
    print()
    rows = [[f"turn {t}"] + [ms(s["at"][str(t)]["total_s"]) for s in sums] for t in turns]
    rows.append([f"turn {turns[-1]} / turn {turns[1]}"] + [f"{s['flat_ratio']['ratio']:.2f}x" for s in sums])
    print(table(["per-turn latency (ms, median of silent turns T-2..T+2)", *names], rows))
    print()
    cols = [str(t) for t in turns] + (["run"] if any("run" in x for x in r["speedups"].values()) else [])
    rows = [[pair] + [f"{ratios[c]:.1f}x" if c in ratios else "-" for c in cols]
            for pair, ratios in r["speedups"].items()]
    print(table(["other / edge-duet, per turn", *[f"turn {c}" if c != "run" else "whole run" for c in cols]], rows))
    print()
    t = str(turns[-1])
    keys = ("render_s", "positions_s", "vision_s", "prefill_s", "decode_s", "other_s", "cache_before")
    rows = [[n] + [ms(s["at"][t].get(k)) if k != "cache_before" else num(s["at"][t].get(k), "{:,.0f}")
                   for k in keys] for n, s in zip(names, sums)]
    print(table([f"turn {t} (ms)", "render + process frames", "positions", "vision", "prefill", "decode",
                 "other (re-anchoring)", "cache (tokens)"], rows))
    m = r["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['threads']} thread(s) per job; copy bandwidth "
          f"{m['bandwidth_gbs']:.1f} GB/s ({', '.join(f'{k} {v:.1f}' for k, v in m.items() if k.startswith('copy'))});"
          f" matmul {m['matmul_gflops']:.0f} GFLOP/s; load average {m.get('load_average_start', '?')} -> "
          f"{m.get('load_average_end', m.get('load_average'))}")


if __name__ == "__main__":
    main(sys.argv[1])
