"""`salad demo` on the shipped checkpoints: the README's main job, shrunk."""
import json
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_demo_writes_a_report_with_every_variant(salad_cli, tmp_path):
    if not (ROOT / "assets" / "adapter.safetensors").exists():
        pytest.fail("assets/adapter.safetensors: the shipped SALAD adapter is missing")
    out = tmp_path / "demo"
    res = subprocess.run([salad_cli, "demo", "--assets", str(ROOT / "assets"), "--out", str(out),
                          "--prompts", "1", "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["label"] for r in rows] == ["dense", "sparse (no tuning)", "SALAD"]
    assert rows[0]["sparsity"] == 0 and rows[2]["sparsity"] > 0.8
    for r in rows:
        assert r["heldout_loss"] > 0 and 0 <= r["metrics"]["sum"] <= 4
    html = (out / "index.html").read_text()
    for needle in ("<table>", "prompt_0.gif", "blocks_head0.png", "SALAD"):
        assert needle in html
    assert (out / "prompt_0.gif").read_bytes()[:6] == b"GIF89a"
    assert (out / "blocks_head0.png").read_bytes()[:4] == b"\x89PNG"
    assert "report:" in res.stdout
