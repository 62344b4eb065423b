"""Parity of the C++ Wan 2.1 DiT (src/model/wan.cpp) with diffusers'
WanTransformer3DModel on a small random model, loading both checkpoint
layouts (diffusers, and official via our own key mapping).

The script writes the weights, inputs and the float64 reference output into a
temporary directory and runs the C++ test WanParity.* of salad_op_tests
(path from $SALAD_OP_TESTS, else build/salad_op_tests) on it.

diffusers computes the sinusoidal timestep embedding in float32; the official
Wan code (and ours) computes it in float64. The reference replaces that one
function with the float64 formula so the comparison is at float32 round-off;
test_diffusers_float32_sinusoid_is_close bounds the gap to stock diffusers.
"""
import math
import os
import pathlib
import subprocess

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
st = pytest.importorskip("safetensors.torch")
try:
    from diffusers import WanTransformer3DModel
except ImportError as e:  # an old diffusers without Wan
    pytest.skip(f"diffusers has no WanTransformer3DModel: {e}", allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_HEADS = 2

# diffusers prefix -> official prefix (whole dotted components). Top level first,
# then the part after "blocks.N.". Official norm3 (affine) is diffusers' norm2.
TOP_RULES = [
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    ("scale_shift_table", "head.modulation"),
]
BLOCK_RULES = [
    ("scale_shift_table", "modulation"),
    ("attn1.to_q", "self_attn.q"),
    ("attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"),
    ("attn1", "self_attn"),
    ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"),
    ("attn2", "cross_attn"),
    ("norm2", "norm3"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
]


def _rename(key, rules):
    for src, dst in rules:
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return key


def to_official(key):
    if key.startswith("blocks."):
        head, idx, rest = key.split(".", 2)
        return f"{head}.{idx}.{_rename(rest, BLOCK_RULES)}"
    return _rename(key, TOP_RULES)


def build_model():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=NUM_HEADS,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        text_dim=64,
        freq_dim=256,
        ffn_dim=256,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # nonzero everywhere, modulation tables included
            if ".norm" in name:  # norm gains near 1: RMS-normed q, k give O(1) logits, so q, k and RoPE matter
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return model


def make_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 12, generator=g)  # token grid 3 x 4 x 6: every axis distinct
    t = torch.tensor([999.0, 250.0])
    context = torch.randn(2, 16, 64, generator=g)
    return x, t, context


def wan_sinusoid(freq_dim):
    """Official Wan sinusoidal_embedding_1d: float64, [cos | sin]."""

    def forward(t):
        half = freq_dim // 2
        pos = t.to(torch.float64)
        arg = torch.outer(pos, torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half))
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)

    return forward


def reference(model, x, t, context):
    """diffusers forward in float64 with Wan's float64 timestep sinusoid."""
    ref = build_model()
    ref.load_state_dict(model.state_dict())
    ref = ref.double()
    ref.condition_embedder.timesteps_proj.forward = wan_sinusoid(ref.config.freq_dim)
    with torch.no_grad():
        return ref(x.double(), t.double(), context.double(), return_dict=False)[0]


def op_tests_binary():
    """$SALAD_OP_TESTS (set by CMake: must hold the test), else build/salad_op_tests if it is current."""
    path = os.environ.get("SALAD_OP_TESTS")
    if path:
        return path
    path = str(ROOT / "build" / "salad_op_tests")
    if not os.path.exists(path):
        pytest.skip(f"salad_op_tests not built ({path}); set SALAD_OP_TESTS")
    listed = subprocess.run([path, "--gtest_list_tests", "--gtest_filter=WanParity.*"], capture_output=True, text=True)
    if "MatchesDiffusersInBothLayouts" not in listed.stdout:
        pytest.skip(f"{path} predates the Wan tests (rebuild it or set SALAD_OP_TESTS)")
    return path


def test_key_mapping_covers_every_diffusers_key():
    model = build_model()
    keys = list(model.state_dict())
    official = [to_official(k) for k in keys]
    assert len(set(official)) == len(keys)
    assert not any(k.startswith(("condition_embedder", "proj_out", "scale_shift_table")) for k in official)
    assert not any(".attn1." in k or ".attn2." in k or ".ffn.net." in k for k in official)
    assert "blocks.1.norm3.weight" in official and "head.modulation" in official


def test_diffusers_float32_sinusoid_is_close():
    model = build_model()
    x, t, context = make_inputs()
    with torch.no_grad():
        stock = model(x, t, context, return_dict=False)[0]
    want = reference(model, x, t, context)
    rel = ((stock.double() - want).norm() / want.norm()).item()
    assert rel < 1e-4, rel


def test_cpp_model_matches_diffusers(tmp_path):
    binary = op_tests_binary()
    model = build_model()
    x, t, context = make_inputs()
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    meta = {"num_heads": str(NUM_HEADS)}
    st.save_file(state, str(tmp_path / "diffusers.safetensors"), metadata=meta)
    st.save_file({to_official(k): v for k, v in state.items()}, str(tmp_path / "official.safetensors"), metadata=meta)
    st.save_file({"x": x, "t": t, "context": context}, str(tmp_path / "inputs.safetensors"))
    out = reference(model, x, t, context)
    assert out.shape == x.shape
    st.save_file({"out": out.contiguous()}, str(tmp_path / "expected.safetensors"))

    env = dict(os.environ, SALAD_WAN_PARITY_DIR=str(tmp_path))
    run = subprocess.run([binary, "--gtest_filter=WanParity.*"], env=env, capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "[  PASSED  ] 1 test" in log and "SKIPPED" not in log, log
