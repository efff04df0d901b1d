"""A test oracle that is not ours: TransformerLens reads the same weights and must agree.

TransformerLens 4.3 (`TransformerBridge.boot_transformers`) loads each tiny random
Hugging Face folder that lmlab loads. The bridge runs in compatibility mode
without weight processing (`enable_compatibility_mode(no_processing=True)`: no
fold_ln, no centring), which gives HookedTransformer's hook meanings (masked
scores are -inf) on the raw weights. Then:

- every lmlab hook point's cached activation equals TL's under the twin name
  the hook vocabulary gives (`lmlab.model.vocabulary`), and every lmlab point
  has one; the shapes are TL's too;
- one intervention per kind of point (projections, q/k norms, rotary, scores,
  pattern, per-head z, sublayer outputs, norms' scale and normalised stream,
  residual stream) gives the same logits in both. The residual edit is at
  `hook_resid_pre`: TL 4.3's bridge aliases `hook_resid_mid` to the pre-MLP
  norm's input, so an edit there reaches only the MLP, not the stream that
  skips it (lmlab's, like HookedTransformer's, edits the stream itself).

Families: Qwen2, Qwen3, Llama and Gemma 3 (text), i.e. every family lmlab has
an adapter for; TL loads all four. And the from-scratch model with learned
positions, through its export to GPT-2 (`lmlab export`), which TL loads as any
GPT-2; its LayerNorm and fused qkv then run in TL's own GPT-2 code, so agreement
there is to float rounding (2e-5) rather than exact. (The rotary from-scratch
model exports to Llama with its residual basis and q/k layout transformed, so its
activations are not TL's one for one; its logits are, see test_export_char.py.)
Norm gains and every weight are moved off their initial values, so "before the
gain" and "after the gain" are different tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from lmlab.hooks.api import run_with_cache
from lmlab.model.adapters import adapter_class, load_adapter, supported_architectures
from lmlab.model.export import export_checkpoint
from lmlab.model.vocabulary import describe, tl_name

from .conftest import random_model
from .test_export_char import checkpoint

# TL warns that an edited norm point is rebuilt off HF's native path: that is the point here
pytestmark = [pytest.mark.filterwarnings("ignore:A forward hook edited:UserWarning"),
              pytest.mark.usefixtures("one_thread")]

FAMILIES = sorted(supported_architectures()) + ["scratch"]
IDX = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
ATOL = {"scratch": 2e-5}  # else 1e-5



@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    """Any real tokenizer: TL wants one at boot, though these tests feed it token ids."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory, tokenizer):
    """(lmlab adapter, TransformerLens bridge) over one tiny random folder."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    model_type = request.param
    folder = tmp_path_factory.mktemp(model_type)
    if model_type == "scratch":
        ckpt = checkpoint(folder / "run")
        adapter = load_adapter(ckpt)[0]
        folder = export_checkpoint(ckpt, folder / "hf")
    else:
        cls = adapter_class(model_type)
        random_model(cls.tiny_config(model_type), seed=1, norm_noise=0.3).save_pretrained(
            str(folder))
        adapter = cls.from_folder(folder, {})
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                              attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(str(folder), device="cpu", hf_model=hf,
                                                     tokenizer=tokenizer)
        bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return model_type, adapter.eval(), bridge.eval()


def test_every_point_equals_its_transformerlens_twin(pair) -> None:
    model_type, adapter, bridge = pair
    with torch.no_grad():
        logits, ours = run_with_cache(adapter, IDX)
        tl_logits, theirs = bridge.run_with_cache(IDX)
    atol = ATOL.get(model_type, 1e-5)
    torch.testing.assert_close(logits, tl_logits, atol=atol, rtol=0)
    assert set(ours) == set(adapter.hook_points())
    for name, act in ours.items():
        assert describe(name) is not None, f"{name} is missing from the hook vocabulary"
        twin = tl_name(name)
        assert twin is not None and twin in theirs, f"TL has no {twin} for {name}"
        ref = theirs[twin]
        assert act.shape == ref.shape, (name, act.shape, ref.shape)
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(act)), f"{name}: masked entries differ"
        torch.testing.assert_close(act[finite], ref[finite], atol=atol, rtol=0, msg=name)


def _scale_head0(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, :, 0] = 0  # z is [batch, pos, head, d_head]: ablate head 0
    return out


# (point, edit): one per kind of point; each must move the logits and agree with TL's
INTERVENTIONS: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("blocks.0.attn.hook_q", lambda x: x * 0.5),
    ("blocks.0.attn.hook_v", lambda x: x * 2.0),
    ("blocks.0.attn.hook_q_normed", lambda x: x * 0.5),
    ("blocks.1.attn.hook_rot_k", lambda x: x.flip(1)),
    ("blocks.1.attn.hook_attn_scores", lambda x: x / 3.0),
    ("blocks.1.attn.hook_pattern", lambda x: x * torch.linspace(0.2, 1.0, x.shape[-1])),
    ("blocks.0.attn.hook_z", _scale_head0),
    ("blocks.0.hook_attn_out", torch.zeros_like),
    ("blocks.1.mlp.hook_pre", lambda x: x * 1.5),
    ("blocks.1.mlp.hook_post", lambda x: -x),
    ("blocks.0.ln1.hook_normalized", lambda x: x * 0.5),
    ("blocks.1.ln2.hook_scale", lambda x: x * 2.0),
    ("blocks.0.ln1_post.hook_normalized", lambda x: x + 0.1),
    ("ln_final.hook_scale", lambda x: x * 0.5),
    ("blocks.1.hook_resid_pre", lambda x: x + 0.05),
]


def test_interventions_give_transformerlens_logits(pair) -> None:
    """Each edit, where the family has the point, moves the logits exactly as in TL."""
    model_type, adapter, bridge = pair
    points = adapter.hook_points()
    done = []
    with torch.no_grad():
        base = adapter(IDX)
        for point, edit in INTERVENTIONS:
            if point not in points:  # q/k norms (Qwen3, Gemma 3), post-norms (Gemma 3), rotary
                continue
            handle = points[point].register_forward_hook(lambda m, i, o, edit=edit: edit(o))
            try:
                ours = adapter(IDX)
            finally:
                handle.remove()
            theirs = bridge.run_with_hooks(
                IDX, fwd_hooks=[(tl_name(point), lambda x, hook, edit=edit: edit(x))])
            assert not torch.equal(ours, base), f"{point}: the edit did not reach the logits"
            torch.testing.assert_close(ours, theirs, atol=ATOL.get(model_type, 1e-5), rtol=0,
                                       msg=point)
            done.append(point)
    extra = {"qwen3": 1, "gemma3_text": 2, "scratch": -1}.get(model_type, 0)
    assert len(done) == len(INTERVENTIONS) - 2 + extra
