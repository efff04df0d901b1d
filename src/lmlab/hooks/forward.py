"""Built-in forward hooks: change an activation on its way through the model.

Each is `fn(x, point, **params) -> tensor` (or a class whose instances are, when
it keeps state). Gradients flow through the change as autograd defines it, so
`scale` by 0.5 also halves what flows back; use a backward hook to change only
the gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.hooks.registry import register


@register("forward")
def scale(x: torch.Tensor, point: str, *, factor: float = 1.0) -> torch.Tensor:
    """Multiply the activation by `factor` (0 ablates it)."""
    return x * factor


class Noise:
    """Random draws for a hook: torch's global RNG, or a private seeded generator.

    With `seed` None the draws come from the global RNG, which the loop seeds
    and checkpoints, so a resumed run continues the very same noise. A seed
    gives the hook its own stream, independent of everything else that draws
    (dropout, other hooks); its position is the hook's state_dict, which the
    loop checkpoints, so a resumed run continues that stream too.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            return torch.randn_like(x)
        gen = self._gens.get(x.device)
        if gen is None:
            gen = self._gens[x.device] = torch.Generator(x.device).manual_seed(self.seed)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        if type(x) is not torch.Tensor:  # maybe a shard under FSDP (imported only then)
            from torch.distributed.tensor import DTensor, distribute_tensor

            if isinstance(x, DTensor):  # the whole tensor's draw, cut as x is cut
                noise = distribute_tensor(noise, x.device_mesh, x.placements, src_data_rank=None)
        return noise

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(device): gen.get_state() for device, gen in self._gens.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._gens = {}
        for name, rng in state.items():
            device = torch.device(name)
            self._gens[device] = torch.Generator(device)
            self._gens[device].set_state(rng)


class NoiseState:
    """state_dict / load_state_dict of a hook whose only state is its `self.noise`."""

    noise: Noise

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.noise.load_state_dict(state)


@register("forward")
class add_noise(NoiseState):
    """Add Gaussian noise of standard deviation `std` (seed: private stream, else global RNG)."""

    def __init__(self, *, std: float = 0.1, seed: int | None = None) -> None:
        self.std, self.noise = std, Noise(seed)

    def __call__(self, x: torch.Tensor, point: str) -> torch.Tensor:
        return x + self.std * self.noise.randn_like(x)


@register("forward")
def zero_ablate(x: torch.Tensor, point: str) -> torch.Tensor:
    """Replace the activation by zeros (nothing flows back through it either)."""
    return torch.zeros_like(x)


@register("forward")
def mean_ablate(x: torch.Tensor, point: str, *, dims: list[int] | None = None) -> torch.Tensor:
    """Replace the activation by its mean over `dims` (default [0], the batch), kept in shape."""
    mean = x.mean(dim=tuple(dims if dims is not None else [0]), keepdim=True)
    return mean.expand_as(x)


@register("forward")
def clamp(x: torch.Tensor, point: str, *, min: float | None = None,
          max: float | None = None) -> torch.Tensor:
    """Clamp the activation into [min, max] (either bound may be left out)."""
    if min is None and max is None:
        raise LmlabError("Hook 'clamp' needs 'min', 'max' or both.")
    return x.clamp(min=min, max=max)


@register("forward", points="*hook_attn_scores")
def attn_temperature(x: torch.Tensor, point: str, *, temperature: float = 1.0) -> torch.Tensor:
    """Divide attention scores by `temperature` (>1 flattens the pattern, <1 sharpens it)."""
    return x / temperature


@register("forward")
class record:
    """Save activations as safetensors files (<dir or run>/activations/<point>/NNNNN), bounded.

    Every `every`-th call of each point is saved, at most `max_records` per
    point, only in training mode unless `during_eval`. The activation is
    detached and copied to the CPU; the model's computation is untouched.
    """

    def __init__(self, *, dir: str | None = None, every: int = 1,
                 max_records: int = 8, during_eval: bool = False) -> None:
        if every < 1 or max_records < 1:
            raise LmlabError("Hook 'record' needs every >= 1 and max_records >= 1.")
        self.dir, self.every, self.max_records = dir, every, max_records
        self.during_eval = during_eval
        self.calls: dict[str, int] = {}
        self.saved: dict[str, int] = {}

    def state_dict(self) -> dict[str, dict[str, int]]:
        """The counters, so a resumed run goes on numbering (and bounding) where it was."""
        return {"calls": dict(self.calls), "saved": dict(self.saved)}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        self.calls, self.saved = dict(state["calls"]), dict(state["saved"])

    def attach(self, adapter: Any, point: str, run_dir: Path | None) -> list:
        if self.dir is not None:
            folder = Path(self.dir)
        elif run_dir is not None:
            folder = Path(run_dir) / "activations"
        else:
            raise LmlabError("Hook 'record' needs a 'dir' outside a training run (which "
                             "would give it the run folder).")
        out = folder / point

        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if not (module.training or self.during_eval):
                return
            n = self.calls[point] = self.calls.get(point, 0) + 1
            k = self.saved.get(point, 0)
            if (n - 1) % self.every or k >= self.max_records:
                return
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            save_file({"activation": output.detach().to("cpu").contiguous()},
                      str(out / f"{k:05d}.safetensors"),
                      metadata={"point": point, "call": str(n)})
            self.saved[point] = k + 1

        return [adapter.hook_points()[point].register_forward_hook(hook)]
