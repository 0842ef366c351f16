#!/usr/bin/env python3
"""Fraction of MoE all-to-all time hidden behind compute, from fp8pipe's per-rank Chrome traces.

    python3 bench/a2a_overlap.py /tmp/x/trace_r*.json [--json] [--min-fb-hidden F]

A trace written with log.trace (parallel/trace.h) holds, besides one "X" event per executed
instruction, "B"/"E" phases: cat "compute" = the compute slices of F/B/W/FB instructions (between
their all-to-all waits; the slices of an overlapped FB's two halves alternate) and cat "a2a" = each
MoE all-to-all from its post to its completion, on a row per model chunk ("a2a d0", "a2a d1").
Per rank, an all-to-all's hidden time is the part of its interval covered by the union of that
rank's compute slices; the hidden fraction is hidden time / all-to-all time. Reported for all
all-to-alls and for those inside FB instructions (the ones the DualPipe overlap targets), per rank
and over all ranks; "FB cross" counts only the cover by the OTHER chunk's compute slices, which
is zero by construction when FB runs its halves one after the other (parallel.fb_overlap=false):
the interleaving's own contribution. "FB wall" is the summed duration of the FB instructions.

--min-fb-cross F: exit 1 unless every rank has all-to-alls inside FB instructions and their
cross-hidden fraction exceeds F (a check for tests; 0 means "the halves did overlap").
"""
import argparse
import json
import sys


def phases(events):
    """(cat, name, tid, begin, end, step) of every B/E pair, matched per thread row."""
    out, stacks = [], {}
    for e in events:
        ph = e.get("ph")
        if ph == "B":
            stacks.setdefault(e["tid"], []).append(e)
        elif ph == "E":
            b = stacks[e["tid"]].pop()
            out.append((b.get("cat", ""), b["name"], b["tid"], b["ts"], e["ts"],
                        b.get("args", {}).get("step")))
    return out


def union(intervals):
    merged = []
    for b, e in sorted(intervals):
        if merged and b <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([b, e])
    return merged


def covered(b, e, merged):
    """Length of [b, e) covered by the sorted disjoint intervals `merged`."""
    total = 0.0
    for mb, me in merged:  # small lists: a linear scan is fine
        if me <= b:
            continue
        if mb >= e:
            break
        total += min(e, me) - max(b, mb)
    return total


def chunk(name):
    """The model chunk of a compute slice ("F3d1" -> "1") or an a2a row ("a2a d1" -> "1")."""
    return name.rsplit("d", 1)[-1]


def analyse(path):
    events = json.load(open(path))["traceEvents"]
    pid = next((e["pid"] for e in events if "pid" in e), -1)
    rows = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    ph = phases(events)
    slices = [(chunk(n), b, e) for c, n, _, b, e, _ in ph if c == "compute"]
    compute = union([(b, e) for _, b, e in slices])
    others = {k: union([(b, e) for c, b, e in slices if c != k]) for k in {c for c, _, _ in slices}}
    a2a = [(chunk(rows[t]), b, e) for c, _, t, b, e, _ in ph if c == "a2a"]
    fb = [(e["ts"], e["ts"] + e["dur"]) for e in events
          if e.get("ph") == "X" and e.get("tid") == 0 and e["name"].startswith("FB")]
    r = {"rank": pid, "a2a": len(a2a), "a2a_us": 0.0, "hidden_us": 0.0, "fb_a2a": 0,
         "fb_a2a_us": 0.0, "fb_hidden_us": 0.0, "fb_cross_us": 0.0,
         "fb_wall_us": sum(e - b for b, e in fb), "compute_us": sum(e - b for b, e in compute)}
    for k, b, e in a2a:
        h = covered(b, e, compute)
        r["a2a_us"] += e - b
        r["hidden_us"] += h
        if any(fb_b <= b and e <= fb_e for fb_b, fb_e in fb):
            r["fb_a2a"] += 1
            r["fb_a2a_us"] += e - b
            r["fb_hidden_us"] += h
            r["fb_cross_us"] += covered(b, e, others.get(k, []))
    return r


def frac(h, t):
    return h / t if t > 0 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("traces", nargs="+", help="per-rank trace files (log.trace)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--min-fb-cross", type=float, default=None)
    a = ap.parse_args()
    ranks = sorted((analyse(p) for p in a.traces), key=lambda r: r["rank"])
    keys = ("a2a", "a2a_us", "hidden_us", "fb_a2a", "fb_a2a_us", "fb_hidden_us", "fb_cross_us",
            "fb_wall_us", "compute_us")
    tot = {k: sum(r[k] for r in ranks) for k in keys}
    tot["rank"] = "all"
    if a.json:
        for r in ranks + [tot]:
            r["hidden_fraction"] = frac(r["hidden_us"], r["a2a_us"])
            r["fb_hidden_fraction"] = frac(r["fb_hidden_us"], r["fb_a2a_us"])
            r["fb_cross_fraction"] = frac(r["fb_cross_us"], r["fb_a2a_us"])
        print(json.dumps({"ranks": ranks, "total": tot}, indent=1))
    else:
        print(f"{'rank':>5} {'a2a':>5} {'a2a ms':>8} {'hidden':>7} {'FB a2a':>6} {'FB a2a ms':>9} "
              f"{'FB hidden':>9} {'FB cross':>8} {'FB wall ms':>10} {'mean a2a us':>11}")
        for r in ranks + [tot]:
            print(f"{r['rank']:>5} {r['a2a']:>5} {r['a2a_us'] / 1e3:>8.1f} "
                  f"{frac(r['hidden_us'], r['a2a_us']):>7.1%} {r['fb_a2a']:>6} "
                  f"{r['fb_a2a_us'] / 1e3:>9.1f} {frac(r['fb_hidden_us'], r['fb_a2a_us']):>9.1%} "
                  f"{frac(r['fb_cross_us'], r['fb_a2a_us']):>8.1%} {r['fb_wall_us'] / 1e3:>10.1f} "
                  f"{r['a2a_us'] / max(r['a2a'], 1):>11.0f}")
    if a.min_fb_cross is not None:
        bad = [r["rank"] for r in ranks
               if r["fb_a2a"] == 0 or not frac(r["fb_cross_us"], r["fb_a2a_us"]) > a.min_fb_cross]
        if bad:
            print(f"a2a_overlap: ranks {bad}: the all-to-alls inside FB instructions are not "
                  f"hidden behind the other chunk's compute (fraction <= {a.min_fb_cross})",
                  file=sys.stderr)
            return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
