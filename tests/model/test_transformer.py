import pytest
import torch

from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.transformer import Transformer, TransformerConfig, apply_rotary, rotary_tables

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(pos: str = "learned", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, d_model=32,
                            d_ff=64, pos_encoding=pos, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_logits_shape_and_causality(pos):
    m = tiny(pos)
    x = torch.randint(0, 97, (3, 32))
    logits = m(x)
    assert logits.shape == (3, 32, 97)
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 1) % 97  # change only the future
    assert torch.allclose(m(x2)[:, :20], logits[:, :20], atol=1e-6)
    assert not torch.allclose(m(x2)[:, 20:], logits[:, 20:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_turns_adjacent_channel_pairs_by_each_positions_angle(dtype):
    T, hd = 12, 8
    x = torch.randn(2, 3, T, hd).to(dtype)
    angles = torch.arange(T).float()[:, None] / 10000 ** (torch.arange(0, hd, 2) / hd)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    expected = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    out = apply_rotary(x, rotary_tables(torch.arange(T), hd))
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=1e-6)
    # a rotation: each pair keeps its length, and position 0 is left as it is
    torch.testing.assert_close(out.float().pow(2).sum(-1), x.float().pow(2).sum(-1),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])


def test_head_is_tied_and_bias_configurable():
    m = tiny()
    assert m.lm_head.weight is m.wte.weight
    assert m.blocks[0].attn.qkv.bias is None
    assert tiny(bias=True).blocks[0].attn.qkv.bias is not None


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_kv_cache_matches_full_forward(pos):
    m = tiny(pos)
    x = torch.randint(0, 97, (2, 32))
    full = m(x)
    cache = m.new_cache(2, torch.device("cpu"), torch.float32)
    steps = [m(x[:, :10], cache)]
    steps += [m(x[:, i:i + 1], cache) for i in range(10, 32)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_full_cache_refuses_more_positions():
    m = tiny("rotary")
    cache = m.new_cache(1, torch.device("cpu"), torch.float32)
    m(torch.zeros(1, 32, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="full"):
        m(torch.zeros(1, 1, dtype=torch.long), cache)


def test_hook_point_names_follow_transformerlens():
    names = set(CustomTransformerAdapter(tiny().cfg).hook_points())
    for n in ["hook_embed", "hook_pos_embed", "hook_logits", "ln_final.hook_normalized",
              "ln_final.hook_scale", "blocks.1.ln1.hook_normalized", "blocks.1.ln2.hook_scale",
              "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
              "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
              "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern",
              "blocks.0.attn.hook_z",
              "blocks.0.hook_attn_out", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post",
              "blocks.0.hook_mlp_out"]:
        assert n in names
    rotary = set(CustomTransformerAdapter(tiny("rotary").cfg).hook_points())
    assert rotary - names == {f"blocks.{i}.attn.hook_rot_{x}" for i in range(2) for x in "qk"}
    assert names - rotary == {"hook_pos_embed"}  # rotary has no position embedding


def test_scores_are_masked_as_transformerlens_and_a_hook_cannot_unmask():
    """hook_attn_scores holds -inf in the future (as on every model); zeroing them stays causal."""
    m = tiny()
    x = torch.randint(0, 97, (2, 8))
    seen = {}
    m.blocks[0].attn.hook_attn_scores.register_forward_hook(
        lambda mod, i, o: seen.setdefault("s", o) * 0)
    m.blocks[0].attn.hook_pattern.register_forward_hook(lambda mod, i, o: seen.setdefault("p", o))
    m(x)
    future = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert torch.isneginf(seen["s"][:, :, future]).all()
    assert torch.isfinite(seen["s"][:, :, ~future]).all()
    uniform = (~future / (~future).sum(-1, keepdim=True)).expand_as(seen["p"])
    torch.testing.assert_close(seen["p"], uniform)


def test_norm_points_are_before_the_gain_and_reading_them_changes_nothing():
    m = tiny(bias=True)
    with torch.no_grad():
        for ln in (m.blocks[0].ln_1, m.ln_final):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    x = torch.randint(0, 97, (2, 8))
    base = m(x)
    got = {}
    pts = {"resid": m.blocks[0].hook_resid_pre, "scale": m.blocks[0].ln1.hook_scale,
           "norm": m.blocks[0].ln1.hook_normalized, "final": m.ln_final.hook_normalized}
    handles = [p.register_forward_hook(lambda mod, i, o, k=k: got.setdefault(k, o))
               for k, p in pts.items()]
    assert torch.equal(m(x), base)  # read-only hooks: the fused LayerNorm still computes it
    r = got["resid"]
    centred = r - r.mean(-1, keepdim=True)
    torch.testing.assert_close(got["scale"], (centred.pow(2).mean(-1, keepdim=True)
                                              + 1e-5).sqrt())
    torch.testing.assert_close(got["norm"], torch.nn.functional.layer_norm(r, (32,)))
    assert got["final"].shape == (2, 8, 32)
    for h in handles:
        h.remove()
    ln = m.blocks[0].ln_1
    m.blocks[0].ln1.hook_normalized.register_forward_hook(lambda mod, i, o: o * 2)
    attn_in = {}
    m.blocks[0].attn.register_forward_pre_hook(lambda mod, args: attn_in.update(h=args[0]))
    m(x)  # an edit is rebuilt through the gain: 2 * x_hat * w + b
    torch.testing.assert_close(attn_in["h"], 2 * got["norm"] * ln.weight + ln.bias)


def test_explicit_attention_equals_fused_kernel():
    m = tiny()
    x = torch.randint(0, 97, (2, 32))
    fused = m(x)
    seen = []
    h = m.blocks[0].attn.hook_pattern.register_forward_hook(lambda mod, i, o: seen.append(o))
    explicit = m(x)
    h.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 2, 32, 32)
    assert torch.allclose(seen[0].sum(-1), torch.ones(2, 2, 32))
    assert torch.allclose(fused, explicit, atol=1e-5)


# --- the speedrun knobs (issue 13) ---------------------------------------------------------

KNOBS = [dict(norm="rmsnorm"), dict(mlp="relu2"), dict(mlp="swiglu"),
         dict(qk_norm=True, pos="rotary"), dict(tie_embeddings=False),
         dict(tie_embeddings=False, zero_init_proj=True), dict(logit_softcap=5.0),
         dict(value_embed=True), dict(embed_skip=True)]


def test_default_model_is_unchanged_bit_for_bit():
    """Weights and first AdamW losses equal those main's code gave before the knobs existed."""
    import torch.nn.functional as F

    for pos, wsum, want in [
        ("learned", 156.233667023404, [4.573432922363281, 4.153263092041016, 4.00773286819458]),
    ]:
        m = tiny(pos).train()
        explicit = tiny(pos, norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True,
                        logit_softcap=None, zero_init_proj=False, value_embed=False,
                        embed_skip=False)
        assert list(m.state_dict()) == list(explicit.state_dict())
        assert sum(float(v.double().sum()) for v in m.state_dict().values()) == pytest.approx(
            wsum, rel=1e-12)
        x = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
        assert torch.equal(m(x), explicit.train()(x))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        got = []
        for _ in range(3):
            loss = F.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten())
            got.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_knob_shapes_gradients_hooks_and_cache(knob):
    knob = dict(knob)
    m = tiny(knob.pop("pos", "learned"), **knob).train()
    x = torch.randint(0, 97, (2, 32))
    logits = m(x)
    assert logits.shape == (2, 32, 97)
    logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    if not knob.get("zero_init_proj"):  # a zero head passes no gradient on at the first step
        assert all(g.abs().sum() > 0 for n, g in grads.items() if n != "wpe.weight"), knob
    names = set(CustomTransformerAdapter(m.cfg).hook_points())
    assert {"ln_final.hook_normalized", "blocks.1.mlp.hook_post", "blocks.0.attn.hook_q",
            "hook_logits", "blocks.1.hook_resid_pre", "blocks.0.ln1.hook_normalized"} <= names
    if knob.get("qk_norm"):
        assert {"blocks.0.attn.hook_q_normed", "blocks.0.attn.hook_k_normed"} <= names
    m.eval()
    cache = m.new_cache(2, torch.device("cpu"), torch.float32)
    steps = [m(x[:, :10], cache)] + [m(x[:, i:i + 1], cache) for i in range(10, 32)]
    assert torch.allclose(torch.cat(steps, 1), m(x), atol=1e-5)


@pytest.mark.parametrize("mlp,act", [("gelu", torch.nn.functional.gelu),
                                     ("relu2", lambda h: torch.relu(h).square()),
                                     ("swiglu", None)])
def test_mlp_hook_post_is_the_activation_output(mlp, act):
    m = tiny(mlp=mlp)
    seen = {}
    mod = m.blocks[0].mlp
    hs = [mod.hook_pre.register_forward_hook(lambda _m, i, o: seen.update(pre=o)),
          mod.hook_post.register_forward_hook(lambda _m, i, o: seen.update(post=o))]
    m(torch.randint(0, 97, (1, 32)))
    for h in hs:
        h.remove()
    assert seen["post"].shape[-1] == 64  # d_ff, whatever the activation
    if act is None:
        gate, up = seen["pre"].chunk(2, -1)
        act = lambda _h: torch.nn.functional.silu(gate) * up  # noqa: E731
    assert torch.allclose(seen["post"], act(seen["pre"]))


def test_rmsnorm_normalises_without_centring_and_final_hook_sees_it():
    m = tiny(norm="rmsnorm")
    seen = []
    h = m.ln_final.hook_normalized.register_forward_hook(lambda _m, i, o: seen.append(o))
    m(torch.randint(0, 97, (1, 32)))
    h.remove()
    assert getattr(tiny(norm="rmsnorm", bias=True).ln_final, "bias", None) is None
    rms = seen[0].square().mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=0.02)  # eps 1e-5 on a small residual


def test_hooked_rmsnorm_points_leave_the_logits_alone():
    m = tiny(norm="rmsnorm")
    x = torch.randint(0, 97, (1, 32))
    plain = m(x)
    hs = [p.register_forward_hook(lambda _m, i, o: o.clone())  # a hook that rebuilds the output
          for p in (m.ln_final.hook_normalized, m.blocks[0].ln1.hook_normalized)]
    hooked = m(x)
    for h in hs:
        h.remove()
    assert torch.allclose(hooked, plain, atol=1e-5)


def test_untied_zero_init_head_starts_uniform_and_softcap_bounds_logits():
    m = tiny(tie_embeddings=False, zero_init_proj=True)
    assert m.lm_head.weight is not m.wte.weight
    assert all(not b.attn.proj.weight.any() and not b.mlp.proj.weight.any() for b in m.blocks)
    assert torch.equal(m(torch.randint(0, 97, (1, 32))), torch.zeros(1, 32, 97))
    capped = tiny(logit_softcap=0.5)(torch.randint(0, 97, (1, 32)))
    assert capped.abs().max() < 0.5


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_bounds_attention_scores(qk_norm):
    m = tiny("rotary", qk_norm=qk_norm)
    attn, seen = m.blocks[0].attn, []
    h = attn.hook_attn_scores.register_forward_hook(lambda _m, i, o: seen.append(o))
    with torch.no_grad():
        attn.qkv.weight.mul_(100)  # huge q and k
        m(torch.randint(0, 97, (1, 32)))
    h.remove()
    # unit-RMS q and k of size 16: |q.k| / sqrt(16) <= 16 / 4
    scores = seen[0][seen[0].isfinite()]  # the masked future is -inf
    assert (scores.abs().max() <= 4.0 + 1e-4) == qk_norm
