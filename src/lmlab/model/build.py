"""Config -> adapter: the from-scratch Transformer, or a registered pretrained model."""

from __future__ import annotations

import dataclasses

from lmlab.config import Config
from lmlab.model.adapters import adapter_class
from lmlab.model.adapters.base import BaseAdapter
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.finetune import apply_lora, base_weights_hash, lora_spec
from lmlab.model.transformer import TransformerConfig


def build_adapter(cfg: Config, vocab_size: int | None = None) -> BaseAdapter:
    m = cfg.model
    if m.model_name is None:
        return CustomTransformerAdapter(TransformerConfig(
            **dataclasses.asdict(m), vocab_size=vocab_size or 97, block_size=cfg.data.block_size))
    from lmlab.model import catalog

    entry = catalog.resolve(m.model_name)
    adapter = adapter_class(entry["architecture_type"]).from_registry(entry, m)
    adapter.block_size = cfg.data.block_size
    ft = cfg.train.finetune
    if ft.method == "lora":
        apply_lora(adapter, lora_spec(ft, base_weights_hash(entry["path"])))
    return adapter
