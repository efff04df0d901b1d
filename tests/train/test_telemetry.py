"""Telemetry against figures computed independently, on the real loop and a tiny model.

The reference values come from outside the telemetry code: the optimizer's own
step hooks see each gradient and the weights before and after the update, the
batcher is spied on for the step's windows, and the activations, logits and
attention patterns are recomputed from the captured weights with
`run_with_cache` on a fresh model.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.config import Config
from lmlab.errors import LmlabError
from lmlab.hooks.api import run_with_cache
from lmlab.model.build import build_adapter
from lmlab.records import read_metrics
from lmlab.train import telemetry as telemetry_module
from lmlab.train.loop import Trainer, train
from lmlab.train.telemetry import Telemetry

ACTS = ["blocks.*.hook_resid_post", "blocks.*.mlp.hook_post"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _telemetry(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if r["kind"] == "telemetry"}


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


class Spy:
    """What the optimizer saw at each step and which windows the batcher gave out."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.before: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        named = list(trainer.state.adapter.network.named_parameters())
        trainer.state.optimizer.register_step_pre_hook(lambda *a: self.before.__setitem__(
            trainer.state.step + 1, {n: (p.detach().clone(), p.grad.clone()) for n, p in named}))
        trainer.state.optimizer.register_step_post_hook(lambda *a: self.after.__setitem__(
            trainer.state.step + 1, {n: p.detach().clone() for n, p in named}))
        draw = trainer.state.batcher.next

        def next_batch():
            batch = draw()
            self.batches.append(batch)
            return batch

        trainer.state.batcher.next = next_batch


def test_values_equal_independent_computation(make_config):
    cfg = make_config(train={"grad_accum": 2, "grad_clip": 0.0},
                      telemetry={"every": 3, "activations": ACTS})
    trainer = Trainer(cfg, progress=False)
    spy = Spy(trainer)
    run = trainer.run()
    tel = _telemetry(run)
    assert sorted(tel) == [3, 6]
    for step, record in tel.items():
        before, after = spy.before[step], spy.after[step]
        for name, (w, g) in before.items():
            assert record[f"grad_norm/{name}"] == pytest.approx(g.norm().item(), rel=1e-5)
            assert record[f"weight_norm/{name}"] == pytest.approx(w.norm().item(), rel=1e-5)
            ratio = (after[name] - w).norm().item() / w.norm().item()
            assert record[f"update_ratio/{name}"] == pytest.approx(ratio, rel=1e-4)
        # the step's two micro-batches, through a fresh model with the weights it had then
        model = build_adapter(cfg, 97)
        model.network.load_state_dict({n: w for n, (w, _) in before.items()}, strict=False)
        micro = spy.batches[2 * (step - 1): 2 * step]
        caches = [run_with_cache(model, x, names=ACTS + ["hook_logits"])[1] for x, _ in micro]
        points = [n for n in model.hook_points() if any(
            n.endswith(s) for s in ("hook_resid_post", "mlp.hook_post"))]
        assert len(points) == 4
        for point in points:
            a = torch.cat([c[point] for c in caches]).double()
            assert record[f"act_rms/{point}"] == pytest.approx(a.square().mean().sqrt().item(),
                                                               rel=1e-5)
            assert record[f"act_mean/{point}"] == pytest.approx(a.mean().item(), rel=1e-4,
                                                                abs=1e-7)
            assert record[f"act_max/{point}"] == pytest.approx(a.abs().max().item(), rel=1e-6)
            assert record[f"act_frac_nonpos/{point}"] == (a <= 0).double().mean().item()
        logits = torch.cat([c["hook_logits"] for c in caches]).double()
        assert record["logits_max"] == pytest.approx(logits.max().item(), rel=1e-6)
        assert record["logits_lse_mean"] == pytest.approx(
            torch.logsumexp(logits, -1).mean().item(), rel=1e-5)
        # attention: the last micro-batch, per layer and head
        _, cache = run_with_cache(model, micro[-1][0], names="blocks.*.attn.hook_pattern")
        for layer in range(2):
            p = cache[f"blocks.{layer}.attn.hook_pattern"].double()
            entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean((0, 2))
            for head in range(2):
                value = record[f"attn_entropy/blocks.{layer}.head{head}"]
                assert value == pytest.approx(entropy[head].item(), rel=1e-5)
                assert 0 < value < math.log(32)


def test_grad_norm_is_of_the_raw_gradient_before_clipping(make_config):
    """With a tiny clip, the optimizer sees a clipped gradient; telemetry reports the raw one."""
    cfg = make_config(train={"grad_clip": 1e-3, "max_steps": 2},
                      telemetry={"every": 2, "attention": False, "logits": False})
    trainer = Trainer(cfg, progress=False)
    spy = Spy(trainer)
    record = _telemetry(trainer.run())[2]
    total = math.sqrt(sum(record[k] ** 2 for k in record if k.startswith("grad_norm/")))
    seen = math.sqrt(sum(g.norm().item() ** 2 for _, g in spy.before[2].values()))
    assert seen == pytest.approx(1e-3, rel=1e-3)
    assert total > 10 * seen


def test_telemetry_changes_nothing_of_the_training(make_config):
    """Dropout, every hook kind, a forward hook drawing from the global RNG: the same curve,
    bit for bit."""
    hooks = {"forward": [{"name": "add_noise", "at": "blocks.*.hook_attn_out", "std": 0.01}],
             "backward": [{"name": "feedback_alignment", "at": "blocks.*.mlp.hook_pre"}],
             "update": [{"name": "clip_per_param", "max_norm": 0.5}],
             "aux_losses": [{"name": "z_loss", "weight": 1e-3}]}
    common = dict(model={"dropout": 0.1}, hooks=hooks, train={"grad_accum": 2})
    off = train(make_config(run={"name": "off"}, **common), progress=False)
    on = train(make_config(run={"name": "on"}, telemetry={"every": 2, "activations": ACTS},
                           **common), progress=False)
    assert sorted(_telemetry(on)) == [2, 4, 6, 8] and not _telemetry(off)
    assert _losses(on) == _losses(off)


def test_points_are_hooked_only_at_telemetry_steps(make_config):
    """Off telemetry steps nothing is attached and attention stays on the fused kernel;
    the attention pass alone (no grad, eval mode) hooks the pattern; nothing is left after."""
    cfg = make_config(telemetry={"every": 4, "activations": ["blocks.*.hook_resid_post"]})
    trainer = Trainer(cfg, progress=False)
    points = trainer.state.adapter.hook_points()
    seen = []

    def look(module, inputs, output):
        seen.append((torch.is_grad_enabled(), module.training,
                     len(points["blocks.1.hook_resid_post"]._forward_hooks),
                     len(points["hook_logits"]._forward_hooks),
                     points["blocks.0.attn.hook_pattern"].active))

    handle = points["hook_embed"].register_forward_hook(look)
    trainer.run()
    handle.remove()
    training = [s for s in seen if s[0]]
    assert len(training) == 8
    assert [(s[2], s[3]) for s in training] == [(1, 1) if i in (3, 7) else (0, 0)
                                                for i in range(8)]
    assert not any(s[4] for s in training), "training must keep the fused attention kernel"
    attention = [s for s in seen if not s[0] and s[4]]
    assert len(attention) == 2 and not any(s[1] for s in attention)
    assert all(not p._forward_hooks and not p.active for p in points.values())


def test_bad_telemetry_input_is_named(make_config):
    with pytest.raises(LmlabError, match="telemetry.every = -1 must be 0"):
        make_config(telemetry={"every": -1})
    with pytest.raises(LmlabError, match="telemetry.histograms go to TensorBoard only"):
        make_config(run={"tensorboard": False}, telemetry={"every": 2, "histograms": True})
    cfg = make_config(telemetry={"every": 2, "activations": ["blocks.*.hook_nope"]})
    with pytest.raises(LmlabError, match=r"telemetry.activations: .*'blocks.\*.hook_nope'.*"
                                         r"blocks.\{i\}.hook_resid_post"):
        Trainer(cfg, progress=False)


def test_histograms_on_a_too_large_model_warn_and_are_skipped(make_config, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(telemetry_module, "HISTOGRAM_MAX_PARAMS", 1000)
    cfg = make_config(train={"max_steps": 2}, telemetry={"every": 1, "histograms": True})
    run = train(cfg, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "histograms" in line]
    assert len(warnings) == 1 and warnings[0].startswith("lmlab: warning: telemetry.histograms: "
                                                         "skipped"), warnings
    assert sorted(_telemetry(run)) == [1, 2]  # the norms are still recorded
    acc = EventAccumulator(str(run / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.Tags()["histograms"] == []


def test_config_hashes_are_unchanged_until_telemetry_is_used():
    base = Config()
    assert base.hash() == "5470deafca8af650"  # what every earlier config hashed to
    assert base.base_hash() == "af6f088090b1de51"
    on = Config()
    on.telemetry.every = 50
    assert on.hash() != base.hash() and on.base_hash() == base.base_hash()
    quiet = Config()
    quiet.run.tensorboard = False
    assert quiet.hash() != base.hash() and quiet.base_hash() == base.base_hash()


def test_an_imported_model_reports_under_the_same_point_names(tmp_path):
    """A tiny random Qwen3 (grouped-query attention, q/k norms) through the same probe."""
    from transformers import Qwen3ForCausalLM

    from lmlab.config import TelemetryConfig
    from lmlab.model.adapters.qwen import QwenAdapter
    from lmlab.records import MetricsLog
    from lmlab.train.distributed import DistInfo
    from tests.model.conftest import tiny_hf_config

    torch.manual_seed(0)
    adapter = QwenAdapter(Qwen3ForCausalLM(tiny_hf_config("qwen3", vocab_size=256)),
                          {"architecture_type": "qwen3"}, block_size=16)
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    tel = Telemetry(TelemetryConfig(every=1, activations=ACTS), adapter, DistInfo(), metrics)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the reference, from the weights before the update
        _, cache = run_with_cache(adapter, x, names=["blocks.*.attn.hook_pattern", *ACTS])
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    probe = tel.probe(1)
    logits = adapter(x)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    grad = adapter.model.model.layers[0].mlp.gate_proj.weight.grad.norm().item()
    probe.before_update(x)
    opt.step()
    probe.after_update()
    (record,) = read_metrics(tmp_path)
    assert record["grad_norm/model.layers.0.mlp.gate_proj.weight"] == pytest.approx(grad, rel=1e-5)
    for layer in range(2):
        p = cache[f"blocks.{layer}.attn.hook_pattern"].double()  # [2, 4 query heads, 16, 16]
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean((0, 2))
        for head in range(4):
            assert record[f"attn_entropy/blocks.{layer}.head{head}"] == pytest.approx(
                entropy[head].item(), rel=1e-5)
        for point in (f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.mlp.hook_post"):
            a = cache[point].double()
            assert record[f"act_rms/{point}"] == pytest.approx(a.square().mean().sqrt().item(),
                                                               rel=1e-5)
            assert record[f"act_frac_nonpos/{point}"] == (a <= 0).double().mean().item()
    assert not any(p._forward_hooks for p in adapter.hook_points().values())


def test_a_skipped_update_at_a_telemetry_step_leaves_no_hook_behind(make_config, tmp_path):
    """train.on_nonfinite=skip ends a step before its update: its hooks must still go."""
    plugin = tmp_path / "poison_fourth.py"
    plugin.write_text(
        "import torch\n"
        "from lmlab.hooks.registry import register\n"
        "calls = [0]\n"
        "@register('forward')\n"
        "def poison_fourth_forward(x, point):\n"
        "    calls[0] += torch.is_grad_enabled()  # evaluation runs without grad\n"
        "    return x * float('nan') if torch.is_grad_enabled() and calls[0] == 4 else x\n")
    cfg = make_config(train={"on_nonfinite": "skip"},
                      hooks={"plugins": [str(plugin)],
                             "forward": [{"name": "poison_fourth_forward", "at": "hook_embed"}]},
                      telemetry={"every": 4, "activations": ACTS})
    trainer = Trainer(cfg, progress=False)
    run = trainer.run()
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "skipped"] == [4]
    assert sorted(_telemetry(run)) == [8]
    assert all(not p._forward_hooks for p in trainer.state.adapter.hook_points().values())


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0)
    return math.degrees(math.acos(cos.clamp(-1, 1).item()))


def test_alignment_angles_equal_independent_computation(make_config):
    """grad_angle: the rule's gradient vs backprop's on the step's last micro-batch, recomputed
    on a fresh model with that step's weights; b_w_angle: FA's B (its documented draw) to W."""
    import zlib

    from lmlab.hooks.api import hooked

    rule = {"name": "feedback_alignment", "at": "blocks.*", "seed": 3}
    cfg = make_config(train={"grad_accum": 2}, hooks={"backward": [rule]},
                      telemetry={"every": 4, "attention": False})
    trainer = Trainer(cfg, progress=False)
    spy = Spy(trainer)
    run = trainer.run()
    tel = _telemetry(run)
    assert sorted(tel) == [4, 8]
    for step, record in tel.items():
        weights = {n: w for n, (w, _) in spy.before[step].items()}
        model = build_adapter(cfg, 97)
        model.network.load_state_dict(weights, strict=False)
        x = spy.batches[2 * step - 1][0]

        def grads(spec, model=model, x=x):
            model.zero_grad(set_to_none=True)
            with hooked(model, spec):
                logits = model(x)[:, :-1]
                torch.nn.functional.cross_entropy(logits.reshape(-1, 97),
                                                  x[:, 1:].reshape(-1)).backward()
            return {n: p.grad.clone() for n, p in model.network.named_parameters()}

        ruled, true = grads({"backward": [rule]}), grads({})
        changed = [n for n, p in model.network.named_parameters()
                   if p.dim() >= 2 and not torch.equal(ruled[n], true[n])]
        assert "blocks.0.attn.qkv.weight" in changed and "blocks.1.mlp.proj.weight" not in changed
        assert sorted(k.removeprefix("grad_angle/") for k in record
                      if k.startswith("grad_angle/")) == sorted(changed)
        for n in changed:
            assert record[f"grad_angle/{n}"] == pytest.approx(_angle(ruled[n], true[n]),
                                                              abs=1e-3)
        for layer in ("blocks.0.attn.qkv", "blocks.1.mlp.fc"):
            w = weights[layer + ".weight"]
            gen = torch.Generator().manual_seed(3 * 1_000_003 + zlib.crc32(layer.encode()))
            b = torch.randn(w.shape, generator=gen) * 0.02
            assert record[f"b_w_angle/{layer}"] == pytest.approx(_angle(b, w), abs=1e-3)


@pytest.mark.parametrize("rule", [{"name": "dfa", "at": "blocks.*", "granularity": "sublayer"},
                                  {"name": "kolen_pollack", "at": "blocks.*"}])
def test_alignment_telemetry_changes_nothing_of_the_training(make_config, rule):
    common = dict(model={"dropout": 0.1}, hooks={"backward": [rule]}, train={"grad_accum": 2})
    off = train(make_config(run={"name": "off"}, **common), progress=False)
    on = train(make_config(run={"name": "on"}, telemetry={"every": 2}, **common),
               progress=False)
    tel = _telemetry(on)
    assert sorted(tel) == [2, 4, 6, 8] and _losses(on) == _losses(off)
    angles = [v for k, v in tel[8].items() if k.startswith("grad_angle/")]
    assert angles and all(0 < a < 180 for a in angles)
    assert any(k.startswith("b_w_angle/") for k in tel[8]) == (rule["name"] != "dfa")
