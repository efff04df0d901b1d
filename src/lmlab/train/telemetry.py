"""Learning-dynamics telemetry: what a learning rule did inside the model, every N steps.

At a telemetry step (`telemetry.every`), one `kind: telemetry` record goes to
metrics.jsonl (and so to TensorBoard), with stable names:

* `grad_norm/<param>`: the norm of the accumulated gradient (the mean over
  micro-batches, as the loop accumulates it), before clipping and update hooks;
  `weight_norm/<param>` before the update; `update_ratio/<param>`: the norm
  of the step the optimizer took over the weight norm (the real step size).
* `act_rms/<point>`, `act_mean/`, `act_max/` (max |x|), `act_frac_nonpos/`
  (the fraction <= 0: dead GELU/ReLU units) of the hook points
  `telemetry.activations` selects, over that step's training forward passes.
* `attn_entropy/blocks.{i}.head{h}`: the mean entropy (nats) of each head's
  attention over that step's last micro-batch, from a separate no-grad forward
  pass with dropout off and the RNG untouched.
* `logits_max`, `logits_lse_mean`: the largest logit and the mean logsumexp
  (the "z" that z-loss keeps near 0) of that step's training forward passes.
* With a learning rule attached (`lmlab.hooks.rules`, `telemetry.alignment`):
  `grad_angle/<param>`, the angle (degrees) between the gradient the rule
  gives each weight matrix it changes and backprop's, both on that step's
  last micro-batch (the next-token loss on its own tokens), from two extra
  forward/backward passes in train mode under one forked RNG (the same
  dropout for both, the training stream untouched, `.grad` untouched);
  `b_w_angle/<layer>`, the angle between a linear's feedback matrix B and its
  weight W (feedback alignment, sign-symmetry, Kolen-Pollack).

Everything is measured through forward hooks that are registered for that step
only and removed right after, so at every other step no point is hooked and
attention keeps its fused kernel; and nothing measured changes the training:
the hooks return nothing, the attention pass runs without grad under a forked
RNG, so a run with telemetry has the very same loss curve as one without.
Under torchrun every rank measures its own batch and shard and the values are
reduced (sums and maxima), so rank 0 records figures of the whole model and the
whole batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist

from lmlab.config import TelemetryConfig
from lmlab.errors import LmlabError
from lmlab.hooks import rules
from lmlab.model.points import PointHooks, match_points
from lmlab.records import MetricsLog, warn
from lmlab.train.distributed import DistInfo

# Weight and gradient histograms copy every parameter to the CPU at each telemetry step;
# past this many parameters that stalls training, so they are skipped with a warning.
HISTOGRAM_MAX_PARAMS = 20_000_000
PATTERN_POINTS = "blocks.*.attn.hook_pattern"


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of an FSDP DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective under FSDP: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Telemetry:
    """The config's `telemetry` section on one adapter; `probe(step)` measures one step."""

    def __init__(self, cfg: TelemetryConfig, adapter: torch.nn.Module, dist: DistInfo,
                 metrics: MetricsLog, histogram: Callable[[str, torch.Tensor, int], None]
                 | None = None, forward_context: Callable[[], Any] = contextlib.nullcontext
                 ) -> None:
        self.cfg, self.adapter, self.dist, self.metrics = cfg, adapter, dist, metrics
        self.forward_context = forward_context
        names = list(adapter.hook_points())
        self.act_points: list[str] = []
        for pattern in cfg.activations:
            try:
                hits = match_points(pattern, names)
            except LmlabError as e:
                raise LmlabError(f"telemetry.activations: {e}") from None
            self.act_points += [n for n in hits if n not in self.act_points]
        self.pattern_points = match_points(PATTERN_POINTS, names) if cfg.attention else []
        self.params = [(n, p) for n, p in adapter.network.named_parameters() if p.requires_grad]
        self.histogram = histogram if cfg.histograms else None
        n_params = sum(p.numel() for _, p in self.params)
        if self.histogram is not None and cfg.every and n_params > HISTOGRAM_MAX_PARAMS:
            self.histogram = None  # on every rank alike: under FSDP drawing one is collective
            if dist.is_main:
                warn(f"telemetry.histograms: skipped, the model has {n_params:,} parameters "
                     f"and histograms are drawn for models up to {HISTOGRAM_MAX_PARAMS:,} (each "
                     "telemetry step would copy every weight and gradient to the CPU). Norms "
                     "are still recorded.")
        self._probe: Probe | None = None

    def probe(self, step: int) -> Probe | NoProbe:
        """The measurement of optimizer step `step` (1-based) if it is due, else a no-op."""
        self.close()  # a step that ended early (a skipped non-finite update) left its hooks
        if not self.cfg.every or step % self.cfg.every:
            return NO_PROBE
        self._probe = Probe(self, step)
        return self._probe

    def close(self) -> None:
        """Remove any hook a step that failed half-way left (a finished step removes its own)."""
        if self._probe is not None:
            self._probe.unhook()
            self._probe = None


class NoProbe:
    """What a step without telemetry gets: nothing is hooked, nothing measured."""

    def before_update(self, x: torch.Tensor) -> None:
        pass

    def after_update(self) -> None:
        pass


NO_PROBE = NoProbe()


class Probe:
    """One telemetry step: hooks on for its forward passes, norms around its update."""

    def __init__(self, tel: Telemetry, step: int) -> None:
        self.tel, self.step = tel, step
        # reduced over ranks: sums of per-rank data, sums of shards, maxima
        self.data_sums: dict[str, torch.Tensor] = {}
        self.shard_sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.before: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.hooks = PointHooks(tel.adapter.hook_points())
        for name in tel.act_points:
            self.hooks.add(name, self._act_hook(name))
        if tel.cfg.logits:
            self.hooks.add("hook_logits", self._logits_hook)

    def unhook(self) -> None:
        self.hooks.remove()

    def _add(self, table: dict[str, torch.Tensor], key: str, value: torch.Tensor,
             combine: Callable = torch.add) -> None:
        value = value.detach().double()
        table[key] = combine(table[key], value) if key in table else value

    def _act_hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            with torch.no_grad():
                x = _local(output).float()
                self._add(self.data_sums, f"act/{name}", torch.stack([
                    x.square().sum(), x.sum(), (x <= 0).sum().float(),
                    torch.tensor(float(x.numel()), device=x.device)]))
                self._add(self.maxima, f"act_max/{name}", x.abs().max(), torch.maximum)

        return hook

    def _logits_hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        with torch.no_grad():
            z = _local(output).float()
            lse = torch.logsumexp(z, dim=-1)
            self._add(self.data_sums, "logits_lse", torch.stack([
                lse.sum(), torch.tensor(float(lse.numel()), device=z.device)]))
            self._add(self.maxima, "logits_max", z.max(), torch.maximum)

    def _pattern_hook(self, layer: str) -> Callable:
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            entropy = torch.special.entr(_local(output).float()).sum(-1)  # [B, H, Tq]
            count = torch.tensor([float(entropy.shape[0] * entropy.shape[2])],
                                 device=entropy.device)
            self._add(self.data_sums, f"attn/{layer}", torch.cat([entropy.sum((0, 2)), count]))

        return hook

    def before_update(self, x: torch.Tensor) -> None:
        """After backward (the gradient is whole), before clipping, update hooks and the step.

        `x` is the step's last micro-batch of token ids, for the attention pass.
        """
        self.unhook()
        tel = self.tel
        if tel.cfg.params:
            for name, p in tel.params:
                w = _local(p.detach())
                self.before.append((name, p, w.clone()))
                self._add(self.shard_sums, f"weight_norm/{name}", w.float().square().sum())
                if p.grad is not None:
                    g = _local(p.grad).float()
                    self._add(self.shard_sums, f"grad_norm/{name}", g.square().sum())
        if tel.histogram is not None:
            for name, p in tel.params:
                tel.histogram(f"weights/{name}", _full(p.detach()), self.step)
                if p.grad is not None:
                    tel.histogram(f"grads/{name}", _full(p.grad), self.step)
        if tel.pattern_points:
            self._attention(x)
        if tel.cfg.alignment and not tel.dist.sharded:
            self._alignment(x)

    def _attention(self, x: torch.Tensor) -> None:
        tel = self.tel
        for name in tel.pattern_points:
            self.hooks.add(name, self._pattern_hook(name.removesuffix(".attn.hook_pattern")))
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        was_training = tel.adapter.training
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices), tel.forward_context():
                tel.adapter.eval()
                tel.adapter(x)
        finally:
            tel.adapter.train(was_training)
            self.unhook()
            if hasattr(tel.adapter, "reshard"):
                # FSDP keeps the root's weights gathered after a forward pass; the clipping
                # and the optimizer step that follow must see its shards again
                tel.adapter.reshard()

    def _alignment(self, x: torch.Tensor) -> None:
        """Angles of each rule's gradient to backprop's (same batch, same dropout) and of B to W."""
        active = rules.active(self.tel.adapter)
        if not active:
            return
        tel = self.tel
        params = [(n, p) for n, p in tel.params if p.dim() >= 2]
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            start = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
            ruled = self._grads(x, params)
            torch.set_rng_state(start[0])
            for d, state in zip(devices, start[1], strict=True):
                torch.cuda.set_rng_state(state, d)
            with rules.bypass():
                true = self._grads(x, params)
        for (name, _), g, t in zip(params, ruled, true, strict=True):
            if t is None or (g is not None and torch.equal(g, t)):
                continue  # a weight the rule leaves on backprop's gradient
            g = torch.zeros_like(t) if g is None else g
            self._add(self.data_sums, f"grad_angle/{name}", _dots(_local(g), _local(t)))
        for rule in active:
            for layer, (b, w) in rule.feedback_pairs().items():
                self._add(self.shard_sums, f"b_w_angle/{layer}", _dots(_local(b), _local(w)))

    def _grads(self, x: torch.Tensor, params: list) -> list[torch.Tensor | None]:
        """d(next-token loss on x)/d(each param), without touching `.grad`."""
        with torch.enable_grad(), self.tel.forward_context():
            logits = self.tel.adapter(x)
        logits = logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 x[:, 1:].reshape(-1))
        return list(torch.autograd.grad(loss, [p for _, p in params], allow_unused=True))

    def after_update(self) -> None:
        """After optimizer.step(): the update norms; then reduce over ranks and record."""
        for name, p, w in self.before:
            self._add(self.shard_sums, f"update/{name}",
                      (_local(p.detach()).float() - w.float()).square().sum())
        self.before.clear()
        data, shards, maxima = (self._reduce(t, op, when) for t, op, when in (
            (self.data_sums, "sum", self.tel.dist.enabled),
            (self.shard_sums, "sum", self.tel.dist.sharded),
            (self.maxima, "max", self.tel.dist.enabled)))
        tel = self.tel
        if tel.metrics.enabled:
            tel.metrics.write(kind="telemetry", step=self.step,
                              **_values(data, shards, maxima))
        tel._probe = None

    def _reduce(self, table: dict[str, torch.Tensor], op: str, across_ranks: bool
                ) -> dict[str, torch.Tensor]:
        """Every entry of `table` summed (or maxed) over ranks, in one collective, on the CPU."""
        if not table:
            return {}
        keys = sorted(table)  # the same order on every rank
        flat = torch.cat([table[k].reshape(-1) for k in keys])
        if across_ranks:
            flat = flat.to(self.tel.dist.device or flat.device)
            torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM if op == "sum"
                                  else torch_dist.ReduceOp.MAX)
        flat, out, i = flat.cpu(), {}, 0
        for k in keys:
            n = table[k].numel()
            out[k], i = flat[i:i + n], i + n
        return out


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a.b, a.a, b.b): summed over ranks or shards, they still give the angle."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return torch.stack([a @ b, a @ a, b @ b])


def _angle(dot: float, aa: float, bb: float) -> float:
    """The angle in degrees between two vectors from their dot products (90 if one is 0)."""
    if aa <= 0 or bb <= 0:
        return 90.0
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))))


def _values(data: dict[str, torch.Tensor], shards: dict[str, torch.Tensor],
            maxima: dict[str, torch.Tensor]) -> dict[str, float]:
    """Reduced sums and maxima -> the recorded figures under their stable names."""
    out: dict[str, float] = {}
    for key, s in shards.items():
        kind, name = key.split("/", 1)
        if kind in ("grad_norm", "weight_norm"):
            out[key] = s.sqrt().item()
    for key, s in (*shards.items(), *data.items()):
        if key.startswith(("grad_angle/", "b_w_angle/")):
            out[key] = _angle(*s.tolist())
    for key, s in shards.items():
        kind, name = key.split("/", 1)
        if kind == "update" and out[f"weight_norm/{name}"] > 0:  # undefined at zero (a bias)
            out[f"update_ratio/{name}"] = s.sqrt().item() / out[f"weight_norm/{name}"]
    for key, s in data.items():
        kind, name = key.split("/", 1) if "/" in key else (key, "")
        if kind == "act":
            sq, total, nonpos, n = s.tolist()
            out[f"act_rms/{name}"] = (sq / n) ** 0.5
            out[f"act_mean/{name}"] = total / n
            out[f"act_frac_nonpos/{name}"] = nonpos / n
            out[f"act_max/{name}"] = maxima[f"act_max/{name}"].item()
        elif kind == "attn":
            *per_head, n = s.tolist()
            for h, e in enumerate(per_head):
                out[f"attn_entropy/{name}.head{h}"] = e / n
        elif kind == "logits_lse":
            total, n = s.tolist()
            out["logits_max"] = maxima["logits_max"].item()
            out["logits_lse_mean"] = total / n
    return out
