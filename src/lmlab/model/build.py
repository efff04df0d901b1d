"""Config -> adapter: the from-scratch Transformer, or a registered pretrained model."""

from __future__ import annotations

from lmlab.config import Config
from lmlab.model.adapters import adapter_class
from lmlab.model.adapters.base import BaseAdapter
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.finetune import apply_lora, base_weights_hash, lora_spec
from lmlab.model.transformer import TransformerConfig


def build_adapter(cfg: Config, vocab_size: int | None = None) -> BaseAdapter:
    m = cfg.model
    if m.model_name is None:
        tcfg = TransformerConfig(
            vocab_size=vocab_size or 97, block_size=cfg.data.block_size, n_layer=m.n_layer,
            n_head=m.n_head, d_model=m.d_model, d_ff=m.d_ff, dropout=m.dropout, bias=m.bias,
            pos_encoding=m.pos_encoding, norm=m.norm, mlp=m.mlp, qk_norm=m.qk_norm,
            tie_embeddings=m.tie_embeddings, logit_softcap=m.logit_softcap,
            zero_init_proj=m.zero_init_proj, value_embed=m.value_embed, embed_skip=m.embed_skip)
        return CustomTransformerAdapter(tcfg)
    from lmlab.model import registry

    entry = registry.resolve(m.model_name)
    adapter = adapter_class(entry["architecture_type"]).from_registry(entry, m)
    adapter.block_size = cfg.data.block_size
    ft = cfg.train.finetune
    if ft.method == "lora":
        apply_lora(adapter, lora_spec(ft, base_weights_hash(entry["path"])))
    return adapter
