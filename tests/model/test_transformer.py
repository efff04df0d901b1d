import pytest
import torch

from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.transformer import Transformer, TransformerConfig


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
