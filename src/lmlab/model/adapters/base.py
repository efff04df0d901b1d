"""BaseAdapter: the one interface the loop, evaluation, sampling and hooks see.

An adapter wraps one architecture family: it owns the network, its tokenizer,
its hook points under the shared TransformerLens names, and knows how to
rebuild itself from the plain dict that `get_config()` returns (which every
checkpoint stores). A new architecture is one new file in this folder holding a
subclass; `adapter_class()` finds it by its `architecture_types`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import LmlabError
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.finetune import is_lora
from lmlab.model.points import HookPoint, collect_hook_points


class BaseAdapter(nn.Module):
    architecture_types: ClassVar[tuple[str, ...]] = ()

    tokenizer: Tokenizer
    block_size: int
    meta: dict[str, Any]  # model_name, model_id, model_source, fine_tuned_from, architecture_type

    def forward(self, idx: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, vocab]; with a cache, continue where it stopped."""
        raise NotImplementedError

    def new_cache(self, batch_size: int) -> Any:
        """A KV cache with `.pos`, `.capacity` and `.reset()` (see KVCache)."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """Plain values from which `from_config` rebuilds the same architecture."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], meta: dict[str, Any]) -> BaseAdapter:
        raise NotImplementedError

    def hook_points(self) -> dict[str, HookPoint]:
        if not hasattr(self, "_hook_points"):
            self._hook_points = collect_hook_points(self.network)
        return self._hook_points

    @property
    def network(self) -> nn.Module:
        """The module whose parameters are trained (and whose names hook points use)."""
        return self.model

    def shard_units(self) -> list[tuple[nn.Module, str]]:
        """(block, method) for each repeated block: FSDP shards and all-gathers one at a time.

        `method` is what the adapter calls to run the block: "forward" when it
        calls the block itself, another name when it runs the block's parts in
        its own order, so that FSDP gathers the block before that method runs.
        """
        raise NotImplementedError

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint keeps: all of them, or on a frozen base (LoRA) the trained."""
        state = self.network.state_dict()
        if not is_lora(self.meta):
            return state
        trained = {n for n, p in self.network.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trained}

    def decay_mask(self, name: str, param: nn.Parameter) -> bool:
        """Whether weight decay applies: matrices yes; norms, biases and embeddings no."""
        return param.dim() >= 2 and "emb" not in name and "wte" not in name and "wpe" not in name

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_checkpoint(self, path: str | Path, **state: Any) -> Path:
        """Write weights and model config with the loop's `state` (the training loop's path)."""
        return save_checkpoint(path, self, **state)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> BaseAdapter:
        """This family's adapter with a loaded checkpoint's weights.

        The seed's `load_checkpoint` is split in two: which family a file holds
        is known only to the package that lists them all, so loading a file is
        `lmlab.model.adapters.load_adapter(path)` (a LoRA one on its base), which
        calls this on the right class.
        """
        adapter = cls.from_config(ckpt["model_config"], ckpt["model_meta"])
        try:
            adapter.network.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise LmlabError(
                f"The weights in '{ckpt.get('path')}' do not fit the architecture it records: "
                f"{str(e).splitlines()[0]}"
            ) from None
        return adapter
