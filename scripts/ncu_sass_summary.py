"""Where a kernel's warps wait, per stretch of code between barriers, from Nsight Compute's SASS page.

    ncu --set full --import-source no -k regex:NAME --launch-skip 2 --launch-count 1 -o REPORT python3 ...
    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 scripts/ncu_sass_summary.py sass.csv --rows 1170

Each stretch ends at a BAR.SYNC; for each it prints the share of the warp-stall samples, the warp
instructions executed (per row of work with --rows), the first instruction and the top stall
reasons, then the instructions with the most samples. Barrier-delimited stretches are the phases
of kernels such as hadamard_k, so this says which phase the time goes to and why.
"""
from __future__ import annotations

import argparse
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"


def _count(row, col, name):
    v = row[col[name]].strip()
    return int(v) if v.isdigit() else 0


def stretches(table):
    """(header columns, data rows, stall names, stretches) of a SASS page read as CSV rows; each
    stretch (a dict of samples, inst, first instruction, stalls) ends at a BAR.SYNC."""
    start = next(i for i, r in enumerate(table) if "Source" in r and SAMPLES in r)
    header, data = table[start], table[start + 1:]
    col = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out = [dict(samples=0, inst=0, first=None, stalls={})]
    for r in data:
        src = r[col["Source"]].strip()
        s = out[-1]
        s["first"] = s["first"] or src
        s["samples"] += _count(r, col, SAMPLES)
        s["inst"] += _count(r, col, "Instructions Executed")
        for h in stalls:
            s["stalls"][h[6:]] = s["stalls"].get(h[6:], 0) + _count(r, col, h)
        if "BAR.SYNC" in src:
            out.append(dict(samples=0, inst=0, first=None, stalls={}))
    return col, data, stalls, [s for s in out if s["first"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    p.add_argument("--rows", type=float, default=1.0, help="divide instruction counts by this (rows of work)")
    p.add_argument("--top", type=int, default=15, help="instructions with the most samples to list")
    args = p.parse_args(argv)
    with open(args.csv, newline="") as f:
        col, data, stalls, parts = stretches(list(csv.reader(f)))
    total = sum(s["samples"] for s in parts) or 1
    print(f"{total} samples, {sum(s['inst'] for s in parts) / args.rows:.0f} warp instructions per row")
    for i, s in enumerate(parts):
        top = sorted(s["stalls"].items(), key=lambda kv: -kv[1])[:4]
        print(f"stretch {i}: {100 * s['samples'] / total:4.1f}% of samples, {s['inst'] / args.rows:8.0f} inst/row, "
              f"from {s['first'][:40]!r}; " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in top if v))
    print("instructions with the most samples:")
    for r in sorted(data, key=lambda r: -_count(r, col, SAMPLES))[:args.top]:
        top = sorted(((h[6:], _count(r, col, h)) for h in stalls), key=lambda kv: -kv[1])[:2]
        print(f"  {100 * _count(r, col, SAMPLES) / total:4.1f}%  {r[col['Source']].strip()[:60]:60s} "
              + ", ".join(f"{k} {v}" for k, v in top if v))


if __name__ == "__main__":
    main()
