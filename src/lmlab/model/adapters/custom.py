"""CustomTransformerAdapter: the from-scratch Transformer with the character tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from lmlab.data.tokenizer import CharTokenizer
from lmlab.model.adapters.base import BaseAdapter
from lmlab.model.transformer import KVCache, Transformer, TransformerConfig


class CustomTransformerAdapter(BaseAdapter):
    architecture_types = ("custom",)

    def __init__(self, cfg: TransformerConfig, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = Transformer(cfg)
        self.tokenizer = CharTokenizer()
        self.block_size = cfg.block_size
        self.meta = {"model_name": None, "model_id": None, "model_source": "scratch",
                     "fine_tuned_from": None, "architecture_type": "custom", **(meta or {})}

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.model(idx, cache)

    def new_cache(self, batch_size: int) -> KVCache:
        p = self.model.wte.weight
        return self.model.new_cache(batch_size, p.device, p.dtype)

    def shard_units(self) -> list[tuple[torch.nn.Module, str]]:
        return [(block, "forward") for block in self.model.blocks]

    def get_config(self) -> dict[str, Any]:
        return self.model.cfg.to_dict()

    @classmethod
    def from_config(cls, config: dict[str, Any], meta: dict[str, Any]) -> CustomTransformerAdapter:
        return cls(TransformerConfig(**config), meta)

    def num_params(self) -> int:
        return self.model.num_params(non_embedding=False)
