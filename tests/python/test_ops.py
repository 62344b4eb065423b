"""torch.ops.salad from Python: gradcheck, opcheck, errors and the CLI."""
import subprocess

import pytest
import torch

GRID = [2, 3, 4]  # L = 24
SMALL = dict(block_q=8, block_k=4, keep=0.5)


def qkv(dtype=torch.float64, B=1, H=2, L=24, D=8, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]


CONFIGS = [
    dict(mode="dense"),
    dict(mode="sparse", pattern="topk"),
    dict(mode="sparse", pattern="window", window=[1, 1, 1], tile=[1, 2, 2]),
    dict(mode="salad", feature="relu"),
    dict(mode="salad", feature="elu1", linear_rope=False),
    dict(mode="salad", feature="softmax", tile=[1, 2, 2]),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_gradcheck_float64(salad_ops, cfg):
    q, k, v = qkv(grad=True)

    def fn(q, k, v):
        o_s, o_l, lse, idx, cnt = salad_ops.attention(q, k, v, GRID, **SMALL, **cfg)
        return (o_s, o_l) if cfg["mode"] == "salad" else o_s

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_outputs_and_block_table(salad_ops):
    q, k, v = qkv(dtype=torch.float32, B=2, H=3)
    o_s, o_l, lse, idx, cnt = salad_ops.attention(q, k, v, GRID, **SMALL)
    assert o_s.shape == o_l.shape == (2, 3, 24, 8)
    assert lse.shape == (2, 3, 24) and lse.dtype == torch.float32
    assert idx.shape == (2, 3, 3, 3) and idx.dtype == torch.int32  # n_q = 24/8, k = ceil(0.5 * 6)
    assert (cnt == 3).all()
    assert (idx[..., 1:] > idx[..., :-1]).all(), "kept blocks are listed in ascending order"
    sel_idx, sel_cnt = salad_ops.select_blocks(q, k, GRID, block_q=8, block_k=4, keep=0.5)
    assert torch.equal(sel_idx, idx) and torch.equal(sel_cnt, cnt)
    # keep = 1 makes sparse equal to dense
    dense = salad_ops.attention(q, k, v, GRID, mode="dense", **{**SMALL, "keep": 1.0})[0]
    full = salad_ops.attention(q, k, v, GRID, mode="sparse", **{**SMALL, "keep": 1.0})[0]
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-6)


def test_bf16_on_cpu_is_computed_in_float32(salad_ops):
    q, k, v = qkv(dtype=torch.float32)
    ref = salad_ops.attention(q, k, v, GRID, **SMALL)
    low = salad_ops.attention(*(t.bfloat16() for t in (q, k, v)), GRID, **SMALL)
    assert low[0].dtype == torch.bfloat16
    assert (low[0].float() - ref[0]).norm() / ref[0].norm() < 2e-2


@pytest.mark.parametrize("mode", ["dense", "sparse", "salad"])
def test_opcheck_attention(salad_ops, mode):
    q, k, v = qkv(dtype=torch.float32, grad=True)
    torch.library.opcheck(
        salad_ops.attention.default,
        (q, k, v, GRID),
        dict(mode=mode, **SMALL),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_opcheck_select_blocks(salad_ops):
    q, k, _ = qkv(dtype=torch.float32)
    torch.library.opcheck(
        salad_ops.select_blocks.default,
        (q, k, GRID),
        dict(block_q=8, block_k=4, keep=0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(grid=[2, 3, 5]), "grid: expected positive (F, H, W) with F*H*W equal to the token count L=24"),
        (dict(keep=0.0), "keep: expected a fraction in (0, 1], got 0"),
        (dict(keep=2.0), "keep: expected a fraction in (0, 1], got 2"),
        (dict(block_q=0), "block_q: expected a positive token count, got 0"),
        (dict(mode="fast"), "mode: expected one of dense|sparse|salad, got 'fast'"),
        (dict(feature="gelu"), "feature: expected one of relu|elu1|softmax, got 'gelu'"),
        (dict(tile=[1, 2]), "tile: expected [] (raster order) or 3 sizes"),
    ],
)
def test_bad_arguments_are_named(salad_ops, change, message):
    q, k, v = qkv(dtype=torch.float32)
    kwargs = dict(SMALL)
    grid = change.pop("grid", GRID)
    kwargs.update(change)
    with pytest.raises(Exception) as err:
        salad_ops.attention(q, k, v, grid, **kwargs)
    assert message in str(err.value)


def test_bad_tensors_are_named(salad_ops):
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(Exception, match=r"v: expected the shape of q"):
        salad_ops.attention(q, k, v[:, :, :23], GRID, **SMALL)
    with pytest.raises(Exception, match=r"D: expected a positive even head width, got 7"):
        salad_ops.attention(q[..., :7], k[..., :7], v[..., :7], GRID, **SMALL)
    with pytest.raises(Exception, match=r"dtype: expected float64, float32, bfloat16 or float16"):
        salad_ops.attention(q.long(), k.long(), v.long(), GRID, **SMALL)


def test_cli_select_reports_the_sparsity(salad_cli):
    out = subprocess.run([salad_cli, "select", "--grid", "4,16,16", "--keep", "0.1"],
                         capture_output=True, text=True, check=True).stdout
    # L = 1024: 8 query blocks x 16 key blocks, k = ceil(1.6) = 2 -> 87.5% sparse
    assert "8 query blocks x 16 key blocks" in out
    assert "sparsity: 87.50%" in out


def test_cli_bench_attn_prints_baseline_and_ratios(salad_cli):
    out = subprocess.run([salad_cli, "bench-attn", "--grid", "2,8,16", "--heads", "1", "--iters", "2",
                          "--warmup", "0", "--block-q", "64", "--block-k", "32", "--backward"],
                         capture_output=True, text=True, check=True).stdout
    for name in ("sdpa(cpu)", "dense", "sparse", "salad", "speed-up"):
        assert name in out


def test_cli_bench_attn_reports_tflops_of_the_attended_pairs(salad_cli):
    # L = 256, D 64, blocks 64/32: keep 0.1 of 8 key blocks -> 1 per query block, 87.5% of the pairs skipped
    out = subprocess.run([salad_cli, "bench-attn", "--grid", "2,8,16", "--heads", "1", "--iters", "3",
                          "--warmup", "1", "--block-q", "64", "--block-k", "32", "--variants", "sdpa,sparse"],
                         capture_output=True, text=True, check=True).stdout
    assert "fwd TFLOP/s" in out and "4 D each forward" in out
    rows = {l.split()[0]: l.split() for l in out.split("(speed-up vs", 1)[1].splitlines()[1:3]}
    pairs = {"sdpa(cpu)": 256 * 256, "sparse": 256 * 256 / 8}
    for name, n in pairs.items():
        ms, tflops = float(rows[name][2]), float(rows[name][4])
        # TFLOP/s x ms = 1e9 FLOP: 4 D per attended pair (ms is printed to 3 decimals)
        assert abs(tflops * ms * 1e9 / (4 * 64 * n) - 1) < 0.05 + 0.0005 / ms


def test_cli_bench_attn_queued_times_back_to_back_calls(salad_cli):
    out = subprocess.run([salad_cli, "bench-attn", "--grid", "2,8,16", "--heads", "1", "--iters", "2",
                          "--warmup", "0", "--block-q", "64", "--block-k", "32", "--queued", "2",
                          "--variants", "sdpa,salad"], capture_output=True, text=True, check=True).stdout
    head, queued = out.split("2 calls queued per synchronisation", 1)
    rows = [l.split() for l in queued.splitlines()[2:] if l.strip()]
    assert [r[0] for r in rows] == ["sdpa(cpu)", "salad"]
    # fwd ms, speed-up against the first row, host ms: the baseline's own ratio is 1.00x
    assert rows[0][2] == "1.00x" and float(rows[1][1]) > 0 and float(rows[1][3]) > 0
    res = subprocess.run([salad_cli, "bench-attn", "--queued", "-1"], capture_output=True, text=True)
    assert res.returncode != 0 and "--queued" in res.stderr


def test_cli_bench_attn_times_the_variants_interleaved_or_blocked(salad_cli):
    base = [salad_cli, "bench-attn", "--grid", "2,8,16", "--heads", "1", "--iters", "2", "--warmup", "1",
            "--block-q", "64", "--block-k", "32", "--queued", "2", "--variants", "sdpa,sparse,salad"]
    for order, says in (("interleaved", "the variants take turns"), ("blocked", "back to back")):
        out = subprocess.run(base + ["--order", order], capture_output=True, text=True, check=True).stdout
        assert f"order: {order} (" in out and says in out
        # every variant timed in both tables (synchronised and queued), the baseline's own ratio 1.00x
        sync, queued = out.split("(speed-up vs", 1)[1].split("calls queued per synchronisation", 1)
        for table in (sync, queued):
            rows = {l.split()[0]: l.split() for l in table.splitlines()[1:]
                    if l.strip() and not l.startswith(("(", "variant", "3 ", "2 "))}
            assert set(rows) == {"sdpa(cpu)", "sparse", "salad"}, table
            assert all(float(r[2 if table is sync else 1]) > 0 for r in rows.values())  # fwd ms
    res = subprocess.run(base + ["--order", "random"], capture_output=True, text=True)
    assert res.returncode != 0 and "--order: expected interleaved | blocked, got 'random'" in res.stderr


def test_cli_bench_attn_backward_from_given_grad_or_from_a_loss(salad_cli):
    base = [salad_cli, "bench-attn", "--grid", "2,8,16", "--heads", "1", "--iters", "2", "--warmup", "0",
            "--block-q", "64", "--block-k", "32", "--backward", "--variants", "sdpa,salad"]
    for mode, says in (("output", "autograd from a given dO"), ("loss", "of the loss sum(o * dO)")):
        out = subprocess.run(base + ["--bwd-grad", mode], capture_output=True, text=True, check=True).stdout
        assert f"backward: {says}" in out
        rows = {l.split()[0]: l.split() for l in out.split("(speed-up vs", 1)[1].splitlines()[1:]
                if l.strip() and not l.startswith("(")}
        # variant, sparsity, fwd ms, fwd speed-up, bwd ms, bwd speed-up, fwd TFLOP/s, bwd TFLOP/s:
        # the backward columns in both rows, the baseline's own ratio 1.00x
        assert set(rows) == {"sdpa(cpu)", "salad"} and rows["sdpa(cpu)"][5] == "1.00x"
        assert all(len(r) == 8 and r[5].endswith("x") for r in rows.values())
    res = subprocess.run(base + ["--bwd-grad", "sum"], capture_output=True, text=True)
    assert res.returncode != 0 and "--bwd-grad: expected output | loss, got 'sum'" in res.stderr


def test_cli_rejects_bad_input_with_a_named_error(salad_cli):
    res = subprocess.run([salad_cli, "select", "--grid", "4,16"], capture_output=True, text=True)
    assert res.returncode != 0
    assert "--grid: expected 3 comma-separated integers, got '4,16'" in res.stderr


def test_library_shares_the_process_cxx_runtime():
    """libsalad.so must not carry a private libstdc++: a compiler that links it
    statically by default gave it one, and its iostreams crashed under Python
    while formatting an error message (GPU machine, session 3)."""
    import os
    import shutil
    from conftest import _lib_path

    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not installed")
    lib = str(_lib_path())
    syms = subprocess.run(["nm", "-C", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    private = [l for l in syms.splitlines() if "std::ostream::_M_insert" in l or "std::locale::classic" in l]
    assert not private, f"{os.path.basename(lib)} defines C++ runtime symbols: {private[:3]}"
    assert "libstdc++.so" in subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
