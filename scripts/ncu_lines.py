#!/usr/bin/env python3
"""Where a kernel's instructions and stall samples go, per source line.

Inputs:
  SASS_CSV  `ncu -i REPORT --page source --csv --print-source sass` of one kernel launch
            (profiled with --section SourceCounters; scripts/gpu_run.sh lines writes them)
  DISASM    `nvdisasm -g -c` of a cubin of the same source built with the same nvcc and flags
            plus -lineinfo (which does not change the code), so instruction i of both is the same
  KERNEL    a substring of the kernel's mangled name in DISASM (e.g. apply_fwd_mma_kernelILi128)
  UNITS     what to divide the executed counts by (e.g. the number of 16-token tiles)

Prints the warp instructions per unit by class (integer, floating point, memory, mma) and the
source lines with the most executed instructions and stall samples.

Usage: ncu_lines.py SASS_CSV DISASM KERNEL UNITS [TOP]
"""
import collections
import csv
import re
import sys


def load_ncu(path):
    rows = list(csv.reader(open(path)))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    ix = {n: i for i, n in enumerate(rows[head])}

    def num(r, name):
        try:
            return float(r[ix[name]].replace(",", ""))
        except (KeyError, ValueError, IndexError):
            return 0.0

    return [(r[ix["Source"]].strip(), num(r, "Instructions Executed"), num(r, "Warp Stall Sampling (All Samples)"))
            for r in rows[head + 1:]]


def load_disasm(path, kernel):
    lines = open(path).read().split("\n")
    start = next((i for i, l in enumerate(lines) if l.startswith(".text.") and kernel in l and l.endswith(":")), None)
    if start is None:
        sys.exit(f"ncu_lines: no kernel matching '{kernel}' in {path}")
    cur, out = "?", []
    for l in lines[start + 1:]:
        if l.startswith(".text.") or l.startswith("//---------------------"):
            break
        m = re.search(r'//## File "([^"]+)", line (\d+)', l)
        if m:
            cur = f"{m.group(1).split('/')[-1]}:{m.group(2)}"
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", l)
        if m:
            out.append((cur, m.group(2).strip()))
    return out


def opclass(text):
    words = text.split()
    if not words:
        return "other"
    op = (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]
    if op in ("HMMA", "HGMMA"):
        return "mma"
    if op in ("LDS", "LDSM", "STS", "LDG", "STG", "LDGSTS", "LDC", "LDL", "STL", "SHFL", "RED", "ATOM"):
        return "memory"
    if op.startswith("F") or op in ("MUFU",):
        return "float"
    return "integer"


def main(argv):
    if len(argv) < 5:
        sys.exit(__doc__)
    ncu, dis = load_ncu(argv[1]), load_disasm(argv[2], argv[3])
    units, top = float(argv[4]), int(argv[5]) if len(argv) > 5 else 25
    if len(ncu) != len(dis):
        sys.exit(f"ncu_lines: {len(ncu)} instructions in the ncu table, {len(dis)} in the disassembly: "
                 "not the same build")
    per_class, per_line, samples = collections.Counter(), collections.Counter(), collections.Counter()
    for (text, executed, sampled), (line, _) in zip(ncu, dis):
        per_class[opclass(text)] += executed
        per_line[line] += executed
        samples[line] += sampled
    total, total_s = sum(per_line.values()), sum(samples.values()) or 1.0
    print(f"warp instructions per unit: {total / units:.0f} ("
          + ", ".join(f"{k} {v / units:.0f}" for k, v in per_class.most_common()) + ")")
    print(f"{'source line':28s} {'per unit':>9s} {'instr':>7s} {'samples':>8s}")
    for line, v in per_line.most_common(top):
        print(f"{line:28s} {v / units:9.1f} {100 * v / total:6.1f}% {100 * samples[line] / total_s:7.1f}%")


if __name__ == "__main__":
    main(sys.argv)
