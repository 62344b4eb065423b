#!/usr/bin/env python3
"""Markdown table of `salad eval` rows (JSON lines), as in docs/RESULTS.md.
   scripts/results_table.py docs/results/world_cpu_run4.jsonl [--time-label "s / video"]
Speed-up and loss ratios are against the row labelled "dense base"."""
import argparse
import json

ap = argparse.ArgumentParser()
ap.add_argument("jsonl")
ap.add_argument("--time-label", default="s / video")
a = ap.parse_args()
rows = [json.loads(l) for l in open(a.jsonl) if l.strip()]
dense = next(r for r in rows if r["label"] == "dense base")
keys = ["subject_consistency", "background_consistency", "imaging_quality", "text_consistency", "sum"]
print(f"| row | sparsity | held-out loss | vs dense | subject | background | imaging | text | sum | {a.time_label} | speed-up |")
print("|---" * 11 + "|")
for r in rows:
    m = r["metrics"]
    label = r["label"].replace("|", "\\|")
    print(f"| {label} | {100 * r['sparsity']:.1f}% | {r['heldout_loss']:.4f} | "
          f"{r['heldout_loss'] / dense['heldout_loss']:.2f}x | "
          + " | ".join(f"{m[k]:.3f}" for k in keys)
          + f" | {r['sec_per_video']:.3f} | {dense['sec_per_video'] / r['sec_per_video']:.2f}x |")
