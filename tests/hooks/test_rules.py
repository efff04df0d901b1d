"""Learning rules (hooks/rules.py), each proven against its own definition.

Every expected gradient here is computed by the test from the rule's
definition (autograd on the plain model, a feedback matrix built by hand), not
by calling the rule's code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmlab.config import from_dict
from lmlab.errors import LmlabError
from lmlab.eval.metrics import cross_entropy
from lmlab.hooks.api import hooked, run_with_cache

from .conftest import tiny_adapter

# --- today's feedback_alignment on the MLPs: behaviour and config hash pinned -------------

MLP_FA = {"name": "feedback_alignment", "at": "blocks.*.mlp.*", "seed": 5}
# recorded with the MLP-only feedback_alignment before the rules were generalised (6aab838)
PINNED_LOSSES = ["0x1.25db000000000p+2", "0x1.0fd8580000000p+2", "0x1.fd9e1e0000000p+1",
                 "0x1.df48200000000p+1", "0x1.c112660000000p+1", "0x1.a0b9560000000p+1"]
PINNED_HASH = "19e5338c2bbe9efa"


def test_mlp_feedback_alignment_keeps_its_losses_and_hash():
    a = tiny_adapter(seed=1)
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    losses = []
    with hooked(a, {"backward": [MLP_FA]}):
        for _ in range(6):
            loss = cross_entropy(a(x)[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float.hex(loss.item()))
    assert losses == PINNED_LOSSES
    assert from_dict({"hooks": {"backward": [MLP_FA]}}).hash() == PINNED_HASH


# --- helpers: what the tests observe, by themselves ---------------------------------------

def seeded_normal(shape, seed: int, key: str, step: int = 0) -> torch.Tensor:
    """The documented draw of a rule's random matrix: N(0, 1) from seed, layer name (and step)."""
    import zlib

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()) + step)
    return torch.randn(shape, generator=gen)


def xavier(w: torch.Tensor) -> float:
    return math.sqrt(2.0 / (w.shape[0] + w.shape[1]))


def linear_io_grads(adapter, idx, spec, names) -> dict[str, tuple]:
    """{linear: (x, g at its output, grad reaching its input, weight grad)} of one backward."""
    seen: dict[str, dict] = {n: {} for n in names}
    mods = dict(adapter.network.named_modules())
    adapter.zero_grad(set_to_none=True)
    with hooked(adapter, spec):  # watchers after the rule's hooks: `post` sees its output
        handles = [h for n in names for h in watch(mods[n], seen[n])]
        try:
            cross_entropy(adapter(idx)[:, :-1], idx[:, 1:]).backward()
        finally:
            for h in handles:
                h.remove()
    return {n: (s["x"], s["g"], s["gx"], mods[n].weight.grad.clone()) for n, s in seen.items()}


def watch(module, seen: dict) -> list:
    """Hooks storing a linear's input x, the gradient at its output (g) and at its input (gx)."""
    def pre(module, inputs):
        x = inputs[0]
        if x.requires_grad:
            x.register_hook(lambda g: seen.__setitem__("gx", g))
        seen["x"] = x.detach()

    def post(module, inputs, output):
        output.register_hook(lambda g: seen.__setitem__("g", g))

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def check_linear_rule(adapter, idx, entry, expected_b) -> None:
    """Input gradient == g @ B (B from the definition); weight gradient == g^T x (true local)."""
    names = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj"]
    mods = dict(adapter.network.named_modules())
    weights = {n: mods[n].weight.detach().clone() for n in names}
    got = linear_io_grads(adapter, idx, {"backward": [entry]}, names)
    for n, (x, g, gx, gw) in got.items():
        b = expected_b(n, weights[n])
        assert torch.allclose(gx, g @ b, atol=1e-7, rtol=1e-5), n
        assert not torch.allclose(gx, g @ weights[n], atol=1e-7, rtol=1e-5), n
        true_gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        assert torch.allclose(gw, true_gw, atol=1e-7, rtol=1e-5), n


# --- FA, sign-symmetry, Kolen-Pollack: g @ B at the input, true local weight gradient ------

def test_feedback_alignment_on_every_linear_of_the_blocks(adapter, idx):
    check_linear_rule(adapter, idx, {"name": "feedback_alignment", "at": "blocks.*", "seed": 4},
                      lambda n, w: seeded_normal(w.shape, 4, n) * 0.02)


def test_feedback_alignment_at_mlp_points_leaves_attention_to_backprop(adapter, idx):
    got = linear_io_grads(adapter, idx, {"backward": [MLP_FA]}, ["blocks.0.attn.qkv"])
    x, g, gx, _ = got["blocks.0.attn.qkv"]
    assert torch.allclose(gx, g @ adapter.network.blocks[0].attn.qkv.weight, atol=1e-7)


@pytest.mark.parametrize("mode", ["usf", "frsf", "brsf"])
def test_sign_symmetry_sends_g_at_its_definitions_b(adapter, idx, mode):
    def b(n, w):
        if mode == "usf":
            return torch.sign(w) * xavier(w)
        return seeded_normal(w.shape, 2, n).abs() * xavier(w) * torch.sign(w)

    check_linear_rule(adapter, idx, {"name": "sign_symmetry", "at": "blocks.*", "mode": mode,
                                     "seed": 2}, b)


def sgd_steps(adapter, idx, spec, n: int, lr: float = 0.05, wd: float = 0.0,
              opt_cls=torch.optim.AdamW, between=None) -> list[float]:
    opt = opt_cls(adapter.parameters(), lr=lr, weight_decay=wd)
    losses = []
    with hooked(adapter, spec):
        for step in range(n):
            loss = cross_entropy(adapter(idx)[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            if between:
                between(step)
            opt.step()
            losses.append(loss.item())
    return losses


def test_frsf_keeps_m_brsf_draws_it_anew_each_step_both_follow_signs(idx):
    """frSF's magnitudes are fixed, brSF's redrawn after each update (BioTorch, Liao et al.);
    after W changes sign, both (and uSF) send feedback with W's new sign."""
    name = "blocks.1.mlp.fc"
    for mode in ("usf", "frsf", "brsf"):
        a = tiny_adapter(seed=3)
        spec = {"backward": [{"name": "sign_symmetry", "at": "blocks.*", "mode": mode,
                              "seed": 1}]}
        sgd_steps(a, idx, spec, 2)  # two optimizer steps taken while the rule was attached
        lin = a.network.blocks[1].mlp.fc
        with torch.no_grad():
            lin.weight.neg_()  # every sign flips
        w = lin.weight.detach().clone()
        # the state (its step count) carries over to a new attachment, as on resume
        rule_state = {"backward.0.sign_symmetry": {"steps": 2}}
        from lmlab.hooks.api import hooks_config
        from lmlab.hooks.manager import ExperimentHooks

        h = ExperimentHooks(hooks_config(spec), a)
        h.load_state_dict(rule_state)
        seen = {}
        with h:
            hs = watch(lin, seen)
            a.zero_grad()
            cross_entropy(a(idx)[:, :-1], idx[:, 1:]).backward()
            for handle in hs:
                handle.remove()
        m = {"usf": torch.full_like(w, xavier(w)),
             "frsf": seeded_normal(w.shape, 1, name).abs() * xavier(w),
             "brsf": seeded_normal(w.shape, 1, name, step=2).abs() * xavier(w)}[mode]
        assert torch.allclose(seen["gx"], seen["g"] @ (m * torch.sign(w)), atol=1e-7), mode
    # brSF's step-2 draw is not its step-0 draw
    assert not torch.equal(seeded_normal((4, 4), 1, name, 2), seeded_normal((4, 4), 1, name))


def test_kolen_pollack_follows_its_definition_while_training_and_aligns(idx):
    a = tiny_adapter(seed=2)
    name = "blocks.1.mlp.fc"
    lin = a.network.blocks[1].mlp.fc
    lr, wd = 0.01, 0.5
    b_ref = seeded_normal(lin.weight.shape, 0, name) * 0.02
    checks, angles = [], []
    opt = torch.optim.AdamW(a.parameters(), lr=lr, weight_decay=wd)
    spec = {"backward": [{"name": "kolen_pollack", "at": "blocks.*"}]}
    with hooked(a, spec):
        for _ in range(30):
            seen = {}
            hs = watch(lin, seen)
            loss = cross_entropy(a(idx)[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            for h in hs:
                h.remove()
            checks.append(torch.allclose(seen["gx"], seen["g"] @ b_ref, atol=1e-7, rtol=1e-4))
            w_old = lin.weight.detach().clone()
            opt.step()
            update = lin.weight.detach() - (1 - lr * wd) * w_old
            b_ref = (1 - lr * wd) * b_ref + update
            cos = torch.nn.functional.cosine_similarity(b_ref.flatten(), lin.weight.flatten(),
                                                        dim=0)
            angles.append(math.degrees(math.acos(cos.clamp(-1, 1).item())))
    assert all(checks), checks
    assert angles[-1] < angles[0] - 10, angles


def test_kolen_pollack_refuses_an_optimizer_it_cannot_mirror(idx):
    a = tiny_adapter()
    spec = {"backward": [{"name": "kolen_pollack", "at": "blocks.*"}]}
    with pytest.raises(LmlabError, match="kolen_pollack cannot mirror SGD with weight_decay"):
        sgd_steps(a, idx, spec, 1, wd=0.1,
                  opt_cls=lambda p, **kw: torch.optim.SGD(p, momentum=0.9, **kw))
    sgd_steps(a, idx, spec, 1, wd=0.0,  # no decay: any update is mirrored
              opt_cls=lambda p, **kw: torch.optim.SGD(p, momentum=0.9, **kw))


# --- DFA: e @ B_u at each unit's output, nothing between units ----------------------------

def dfa_b(layer_point: str, vocab: int, width: int, seed: int = 0) -> torch.Tensor:
    return seeded_normal((vocab, width), seed, layer_point) * 0.02


def fixed_error_loss(vocab: int):
    """A loss whose gradient at the logits, e, is a fixed random tensor R (whatever the model)."""
    r = torch.randn(2, 16, vocab, generator=torch.Generator().manual_seed(9))
    return r, lambda logits, idx: (logits * r).sum()


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_dfa_sends_e_through_b_to_each_unit_output_exactly(adapter, idx, granularity):
    r, loss = fixed_error_loss(97)
    outs = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    if granularity == "sublayer":
        outs += ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]
    with hooked(adapter, {"backward": [{"name": "dfa", "at": "blocks.*",
                                        "granularity": granularity}]}):
        _, cache = run_with_cache(adapter, idx, names=outs + ["hook_logits"], incl_bwd=True,
                                  loss_fn=loss)
    assert torch.equal(cache["hook_logits_grad"], r)
    for point in outs:
        expected = (r.reshape(-1, 97) @ dfa_b(point, 97, 32)).reshape(2, 16, 32)
        assert torch.equal(cache[point + "_grad"], expected), point


def test_dfa_block_gradients_do_not_depend_on_the_blocks_above(idx):
    """With e fixed, block 0 and the embedding learn the same whatever block 1 computes."""
    r, loss = fixed_error_loss(97)
    spec = {"backward": [{"name": "dfa", "at": "blocks.*"}]}

    def block0_grads(scramble: bool) -> dict[str, torch.Tensor]:
        a = tiny_adapter(seed=5)
        if scramble:
            with torch.no_grad():
                for p in a.network.blocks[1].parameters():
                    p.normal_()
        with hooked(a, spec):
            run_with_cache(a, idx, names="hook_logits", incl_bwd=True, loss_fn=loss)
        return {n: p.grad for n, p in a.network.named_parameters()
                if n.startswith(("blocks.0.", "wpe."))}

    plain, scrambled = block0_grads(False), block0_grads(True)
    assert plain and all(torch.equal(plain[n], scrambled[n]) for n in plain)
    # under backprop block 0 does depend on block 1
    a, b = tiny_adapter(seed=5), tiny_adapter(seed=5)
    with torch.no_grad():
        for p in b.network.blocks[1].parameters():
            p.normal_()
    for m in (a, b):
        run_with_cache(m, idx, names="hook_logits", incl_bwd=True, loss_fn=loss)
    assert not torch.equal(a.network.blocks[0].mlp.fc.weight.grad,
                           b.network.blocks[0].mlp.fc.weight.grad)


def param_grads(adapter, idx, spec, micro: int = 1, aux: bool = False) -> dict:
    """Gradients of the mean next-token loss (+ aux losses) over `micro` micro-batches."""
    adapter.zero_grad(set_to_none=True)
    with hooked(adapter, spec) as h:
        for chunk in idx.chunk(micro):
            loss = cross_entropy(adapter(chunk)[:, :-1], chunk[:, 1:])
            if aux:
                loss = loss + sum(h.aux_losses().values())
            (loss / micro).backward()
    return {n: p.grad.clone() for n, p in adapter.network.named_parameters()
            if p.grad is not None}


def test_dfa_under_grad_accumulation_is_the_mean_of_the_micro_batches(idx):
    """As for backprop: accumulating k micro-batches gives the whole batch's DFA gradient."""
    a = tiny_adapter(seed=6)
    batch = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    spec = {"backward": [{"name": "dfa", "at": "blocks.*", "granularity": "sublayer"}]}
    whole, split = param_grads(a, batch, spec), param_grads(a, batch, spec, micro=2)
    assert whole.keys() == split.keys()
    for n in whole:
        assert torch.allclose(whole[n], split[n], atol=1e-7, rtol=1e-5), n


def test_dfa_aux_loss_inside_a_unit_is_backpropagated_within_it(idx):
    """An aux loss at a point inside a unit adds its ordinary gradient (it depends on nothing
    above): grads(DFA, CE + aux) == grads(DFA, CE) + grads(backprop, aux alone)."""
    a = tiny_adapter(seed=7)
    aux = {"aux_losses": [{"name": "act_l2", "at": "blocks.0.hook_mlp_out", "weight": 3.0}]}
    rule = {"backward": [{"name": "dfa", "at": "blocks.*"}]}
    both = param_grads(a, idx, {**rule, **aux}, aux=True)
    ce = param_grads(a, idx, rule)
    a.zero_grad(set_to_none=True)
    with hooked(a, aux) as h:
        a(idx)
        sum(h.aux_losses().values()).backward()
    aux_only = {n: p.grad for n, p in a.network.named_parameters() if p.grad is not None}
    assert aux_only and set(aux_only) <= set(both)
    for n in both:
        expected = ce[n] + aux_only[n] if n in aux_only else ce[n]
        assert torch.allclose(both[n], expected, atol=1e-7, rtol=1e-5), n


def test_shallow_only_the_readout_learns(adapter, idx):
    g = param_grads(adapter, idx, {"backward": [{"name": "shallow", "at": "blocks.*"}]})
    assert set(g) == {"ln_final.weight", "wte.weight"}  # the head is tied to wte
    true = param_grads(adapter, idx, {})
    assert torch.equal(g["ln_final.weight"], true["ln_final.weight"])


# --- gradients at every point: run_with_cache(incl_bwd=True) ------------------------------

def test_incl_bwd_gives_every_point_its_gradient_norm_points_included(adapter, idx):
    logits, cache = run_with_cache(adapter, idx, names=None, incl_bwd=True)
    points = list(adapter.hook_points())
    grads_ = {p: cache.get(p + "_grad") for p in points}
    missing = [p for p, g in grads_.items() if g is None and "pos_embed" not in p]
    assert not missing, missing
    for p in points:
        if grads_[p] is not None:
            assert grads_[p].shape == cache[p].shape, p
    # the norm's rebuilt output is the module's own, to float rounding
    assert torch.allclose(logits, adapter(idx), atol=1e-5)


@pytest.mark.parametrize("point", ["blocks.0.ln1.hook_normalized", "blocks.1.ln2.hook_scale",
                                   "ln_final.hook_normalized", "blocks.0.attn.hook_pattern"])
def test_incl_bwd_gradient_is_the_loss_s_derivative_along_any_direction(idx, point):
    """<grad, D> equals (L(a + eps D) - L(a - eps D)) / 2 eps, in float64: the true gradient."""
    a = tiny_adapter(seed=8).double()

    def loss64(logits, idx):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97),
                                                 idx[:, 1:].reshape(-1))

    _, cache = run_with_cache(a, idx, names=point, incl_bwd=True, loss_fn=loss64)
    d = torch.randn(cache[point].shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64) * cache[point].abs()  # relative: a scale stays > 0
    eps, losses = 1e-2, []  # a hooked norm computes in float32, even for float64
    for sign in (1, -1):
        handle = a.hook_points()[point].register_forward_hook(
            lambda m, i, o, sign=sign: o + sign * eps * d)
        with torch.no_grad():
            logits = a(idx)
        handle.remove()
        losses.append(cross_entropy(logits[:, :-1], idx[:, 1:]).item())
    numeric = (losses[0] - losses[1]) / (2 * eps)
    assert math.isclose((cache[point + "_grad"] * d).sum().item(), numeric, rel_tol=1e-2,
                        abs_tol=1e-9)


# --- bad input: one line naming the problem and the fix -----------------------------------

@pytest.mark.parametrize("entry, message", [
    ({"name": "feedback_alignment", "at": "blocks.*.ln1.*"}, "found no linear layer"),
    ({"name": "sign_symmetry", "at": "blocks.*", "mode": "brfs"}, "Did you mean 'brsf'"),
    ({"name": "dfa", "at": "blocks.*", "granularity": "blocks"}, "Did you mean 'block'"),
    ({"name": "kolen_pollack", "at": "hook_embed"}, "acts only on points matching 'blocks.*'"),
])
def test_bad_rule_entries_are_one_clear_line(adapter, entry, message):
    with pytest.raises(LmlabError, match=message) as e:
        with hooked(adapter, {"backward": [entry]}):
            pass
    assert "\n" not in str(e.value)
    assert all(not m._forward_hooks for m in adapter.modules())  # nothing left attached


def test_dfa_on_a_model_whose_blocks_it_cannot_find(adapter):
    adapter.hook_points()  # the points keep their names; the block list is renamed
    adapter.network.layers_renamed = adapter.network.blocks
    del adapter.network.blocks
    with pytest.raises(LmlabError, match="dfa cannot find the blocks of Transformer"):
        with hooked(adapter, {"backward": [{"name": "dfa", "at": "blocks.*"}]}):
            pass


# --- imported models ----------------------------------------------------------------------

def test_feedback_alignment_fine_tunes_an_imported_qwen2(idx):
    from transformers import AutoModelForCausalLM

    from lmlab.model.adapters import adapter_class

    cls = adapter_class("qwen2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls.tiny_config("qwen2", vocab_size=97))
    a = cls(model, {})
    spec = {"backward": [{"name": "feedback_alignment", "at": "blocks.*", "seed": 1}]}
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    got = linear_io_grads(a, idx, spec, names)
    for n, (x, g, gx, gw) in got.items():
        key = "blocks." + n.removeprefix("model.layers.")
        w = dict(a.network.named_modules())[n].weight
        assert torch.allclose(gx, g @ (seeded_normal(w.shape, 1, key) * 0.02), atol=1e-7), n
        assert torch.allclose(gw, g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]),
                              atol=1e-6), n
    with hooked(a, spec) as h:
        rule = h.point_fns[0][1]
        assert {k.split(".")[-1] for k in rule.linears} == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    losses = sgd_steps(a, torch.randint(0, 12, (8, 16), generator=torch.Generator()
                                        .manual_seed(0)), spec, 25, lr=3e-3)
    assert losses[-1] < losses[0] - 1.0, losses


# --- exact resume, through the real training loop -----------------------------------------

RESUME_SETS = {
    "fa-brsf-kp": [{"name": "feedback_alignment", "at": "blocks.0.attn.*"},
                   {"name": "sign_symmetry", "at": "blocks.0.mlp.*", "mode": "brsf"},
                   {"name": "kolen_pollack", "at": "blocks.1.*", "seed": 2}],
    "dfa-usf-frsf": [{"name": "dfa", "at": "blocks.*", "granularity": "sublayer"},
                     {"name": "sign_symmetry", "at": "blocks.0.*", "mode": "usf"},
                     {"name": "sign_symmetry", "at": "blocks.1.*", "mode": "frsf"}],
    "shallow": [{"name": "shallow", "at": "blocks.*"}],
}


@pytest.mark.parametrize("rules", list(RESUME_SETS))
def test_every_rule_resumes_bit_exactly(corpus_dir, tmp_path, rules):
    import shutil

    from lmlab.model.checkpoint import load_checkpoint
    from lmlab.records import read_metrics
    from lmlab.train.loop import config_for_resume, train
    from tests.conftest import tiny_config

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}

    cfg = tiny_config(corpus_dir, tmp_path / "runs", hooks={"backward": RESUME_SETS[rules]},
                      train={"grad_accum": 2})
    run = train(cfg, progress=False)
    straight = losses(run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    mid = str(copy / "checkpoints" / "ckpt_0000004.pt")
    train(config_for_resume(mid, None, []), resume=mid, progress=False)
    assert len(straight) == 8 and losses(copy) == straight
    if rules == "fa-brsf-kp":
        state = load_checkpoint(mid)["hooks"][0]
        assert state["backward.1.sign_symmetry"] == {"steps": 4}
        b_minus_w = state["backward.2.kolen_pollack"]["blocks.1.mlp.fc"]
        start = seeded_normal(b_minus_w.shape, 2, "blocks.1.mlp.fc") * 0.02
        assert b_minus_w.shape == (64, 32) and not torch.equal(b_minus_w, start)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama", "gemma3_text"])
def test_every_rule_runs_on_each_imported_family(idx, kind):
    """Each rule attaches to the family's own modules; DFA's e @ B_u reaches its block outputs."""
    from transformers import AutoModelForCausalLM

    from lmlab.model.adapters import adapter_class

    cls = adapter_class(kind)
    torch.manual_seed(0)
    a = cls(AutoModelForCausalLM.from_config(cls.tiny_config(kind, vocab_size=97)), {})
    for rule in (RESUME_SETS["fa-brsf-kp"], RESUME_SETS["dfa-usf-frsf"],
                 RESUME_SETS["shallow"]):
        grads = param_grads(a, idx, {"backward": rule})
        assert grads and all(torch.isfinite(g).all() for g in grads.values()), (kind, rule)
    r, loss = fixed_error_loss(97)
    with hooked(a, {"backward": [{"name": "dfa", "at": "blocks.*"}]}):
        _, cache = run_with_cache(a, idx, names="blocks.*.hook_resid_post", incl_bwd=True,
                                  loss_fn=loss)
    for layer in range(2):
        point = f"blocks.{layer}.hook_resid_post"
        b = dfa_b(point, 97, 32)
        assert torch.allclose(cache[point + "_grad"], (r.reshape(-1, 97) @ b).reshape(2, 16, 32),
                              atol=1e-7), (kind, point)


def test_kolen_pollack_with_sgd_momentum_stops_the_run_before_any_update(make_config):
    from lmlab.model.checkpoint import list_checkpoints
    from lmlab.records import read_metrics
    from lmlab.train.loop import train

    cfg = make_config(hooks={"backward": [{"name": "kolen_pollack", "at": "blocks.*"}]},
                      train={"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1})
    with pytest.raises(LmlabError, match="^kolen_pollack cannot mirror SGD") as e:
        train(cfg, progress=False)
    assert "\n" not in str(e.value)
    (run,) = (cfg_dir for cfg_dir in (Path(cfg.run.out_dir)).iterdir())
    assert not [r for r in read_metrics(run) if r["kind"] == "train"]
    assert not list_checkpoints(run / "checkpoints")
