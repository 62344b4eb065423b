#!/usr/bin/env python3
"""Per-kernel table of an `ncu --csv --metrics gpu__time_duration.sum,...` log (scripts/gpu_run.sh prof).

One row per launch, in launch order: kernel name (namespaces and arguments stripped), time in us,
DRAM and SM throughput in % of peak. Usage: ncu_table.py ncu.csv
"""
import csv
import re
import sys

# time units as ncu prints them (both spellings seen), to microseconds
SCALE = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def short(name):
    name = name.replace("(anonymous namespace)::", "").replace("void ", "")
    name = re.sub(r"\(.*", "", name)  # arguments
    return name.replace("salad::cuda::detail::", "").replace("salad::", "")[:64]


def main(path):
    rows = [r for r in csv.reader(open(path)) if len(r) > 10]
    if not rows:
        print("no ncu rows in", path)
        return
    hdr = rows[0]
    ki, mi, vi, ui, ii = (hdr.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value", "Metric Unit", "ID"))
    launches = {}
    for r in rows[1:]:
        key = (int(r[ii]), short(r[ki]))
        v = float(r[vi].replace(",", ""))
        launches.setdefault(key, {})[r[mi]] = v * SCALE[r[ui]] if r[mi] == "gpu__time_duration.sum" else v
    print(f"{'id':>4s} {'kernel':64s} {'us':>9s} {'dram%':>6s} {'sm%':>6s}")
    for (i, name), m in sorted(launches.items()):
        t = m.get("gpu__time_duration.sum", 0.0)
        dram = m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
        sm = m.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
        print(f"{i:4d} {name:64s} {t:9.1f} {dram:6.1f} {sm:6.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
