"""Shared Hugging Face plumbing for the adapters of imported models.

`HFCausalLMAdapter` runs a Llama-style decoder (Llama, Qwen2, Qwen3, ...) by
calling the Hugging Face model's *own* submodules in the same order as its
forward: the weights, their names and `save_pretrained` / `from_pretrained`
stay exactly Hugging Face's, while every TransformerLens-named `HookPoint` sits
on the activation it names. That is why a forward hook on, say,
`blocks.0.hook_attn_out` can see and replace the attention output of an imported
Qwen exactly as it does on the from-scratch model. Attention itself is the
shared core in `lmlab.model.attention` (the from-scratch model runs the same
code), and norms expose TL's `hook_scale` / `hook_normalized` via
`lmlab.model.norms`.

A family adapter (one file in `model/adapters/`) names its `model_type`s and
Hugging Face classes and, where the family differs, overrides one of the small
methods the forward is made of: `_embed`, `_rope`, `_norm`, `_block`, `_qkv`,
`_qk_norm`, `_attention`, `_mlp` (Gemma 3 overrides `_rope`, `_norm` and
`_block`). A config this code would compute wrongly is refused by `check_config`.

Generation uses the one KV cache of every model (`model.attention.KVCache`).
Also here: dtype helpers (the tokenizer is in `model/hf_tokenizer.py`). Weights
load in float32 unless the config asks otherwise, since transformers 5.x keeps a
checkpoint's bf16 and CPU training wants float32.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.model.adapters.base import BaseAdapter
from lmlab.model.attention import KVCache, add_attention_points, attend, on_heads
from lmlab.model.catalog import model_dir, resolve, verify_weights
from lmlab.model.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from lmlab.model.losses import IGNORE_INDEX, linear_cross_entropy
from lmlab.model.norms import NormPoints, hooked_norm
from lmlab.model.points import HookPoint, collect_hook_points

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype) -> torch dtype; None is float32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LmlabError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- hook points ----------------------------------------------------------------------


class _AttnPoints(nn.Module):
    def __init__(self, qk_norm: bool) -> None:
        super().__init__()
        add_attention_points(self, rotary=True, qk_norm=qk_norm)


class _MLPPoints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_pre = HookPoint()  # gate projection, before the activation
        self.hook_pre_linear = HookPoint()  # up projection
        self.hook_post = HookPoint()  # act(gate) * up, the input of down_proj


class _BlockPoints(nn.Module):
    def __init__(self, norms: tuple[str, ...], qk_norm: bool) -> None:
        super().__init__()
        self.hook_resid_pre, self.hook_resid_mid = HookPoint(), HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()
        for name in norms:
            setattr(self, name, NormPoints())
        self.attn, self.mlp = _AttnPoints(qk_norm), _MLPPoints()


class HookTree(nn.Module):
    """The HookPoints of an n-layer decoder, laid out so module paths are the shared names.

    It holds no parameters, so the Hugging Face model's state_dict is untouched.
    """

    def __init__(self, n_layer: int, norms: tuple[str, ...], qk_norm: bool) -> None:
        super().__init__()
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(_BlockPoints(norms, qk_norm) for _ in range(n_layer))
        self.ln_final = NormPoints()
        self.hook_logits = HookPoint()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


# --- the adapter ----------------------------------------------------------------------


class HFCausalLMAdapter(BaseAdapter):
    """A Llama-style Hugging Face causal LM behind BaseAdapter (subclassed per family)."""

    # model_type -> transformers class name; a family adapter fills this in
    hf_classes: ClassVar[dict[str, str]] = {}
    # the norms of a block, by TransformerLens's names (each gets hook_scale / hook_normalized)
    block_norms: ClassVar[tuple[str, ...]] = ("ln1", "ln2")

    def __init__(self, hf_model: nn.Module, meta: dict[str, Any],
                 block_size: int | None = None) -> None:
        super().__init__()
        self.model = hf_model
        cfg = hf_model.config
        self.block_size = int(block_size or cfg.max_position_embeddings)
        self.meta = {"model_name": None, "model_id": None, "model_source": None,
                     "fine_tuned_from": None, "architecture_type": cfg.model_type, **meta}
        qk_norm = hasattr(hf_model.model.layers[0].self_attn, "q_norm")
        self.points = HookTree(cfg.num_hidden_layers, self.block_norms, qk_norm)
        self._tokenizer: HFTokenizer | None = None
        self._tokenizer_folder: Path | None = None
        self.models_root: Path | None = None  # the registry its tokenizer is looked up in

    # -- construction ------------------------------------------------------------------

    @classmethod
    def model_class(cls, model_type: str) -> type:
        """The transformers class for a model_type this family supports (never remote code)."""
        import transformers

        if model_type not in cls.hf_classes:
            raise LmlabError(
                f"{cls.__name__} does not support model_type '{model_type}'; it supports "
                f"{', '.join(sorted(cls.hf_classes))}."
            )
        return getattr(transformers, cls.hf_classes[model_type])

    @classmethod
    def check_config(cls, hf_config: dict[str, Any]) -> None:
        """Refuse a config whose forward this adapter would not compute exactly (base: none)."""

    @classmethod
    def tiny_config(cls, model_type: str, **over: Any) -> Any:
        """A tiny random-weights config of this family, for parity tests (GQA, tied embeddings)."""
        from transformers import CONFIG_MAPPING

        cls.model_class(model_type)  # refuses a model_type this family does not cover
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=128, tie_word_embeddings=True, vocab_size=256)
        return CONFIG_MAPPING[model_type](**(kw | over))

    @classmethod
    def from_folder(cls, folder: str | Path, meta: dict[str, Any],
                    dtype: str | torch.dtype | None = "float32",
                    block_size: int | None = None) -> HFCausalLMAdapter:
        """Load a Hugging Face folder's weights (float32 unless `dtype` says otherwise)."""
        folder = Path(folder)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise LmlabError(f"{folder} has no config.json, so it is not a Hugging Face model "
                             "folder. Re-import the model with `python main.py import-model`.")
        hf_dict = json.loads(cfg_file.read_text())
        model_cls = cls.model_class(hf_dict.get("model_type"))
        cls.check_config(hf_dict)
        model = model_cls.from_pretrained(str(folder), dtype=torch_dtype(dtype),
                                          attn_implementation="sdpa")
        return cls(model, meta, block_size)

    @classmethod
    def from_registry(cls, entry: dict[str, Any], model_cfg: Any = None) -> HFCausalLMAdapter:
        """Load a registered model to fine-tune it: checkpoints will name it as the parent."""
        name = entry["model_name"]
        if entry.get("architecture_type") not in cls.hf_classes:
            raise LmlabError(
                f"Registry entry '{name}' has architecture '{entry.get('architecture_type')}', "
                f"which {cls.__name__} does not handle."
            )
        folder = Path(entry["path"]) if entry.get("path") else model_dir(name)
        meta = {"model_name": name, "model_id": entry.get("model_id"),
                "model_source": entry.get("source"), "fine_tuned_from": name,
                "architecture_type": entry["architecture_type"]}
        dtype = getattr(model_cfg, "dtype", None) or "float32"
        verify_weights({**entry, "path": str(folder)})
        adapter = cls.from_folder(folder, meta, dtype=dtype)
        adapter._tokenizer_folder = folder
        return adapter

    @classmethod
    def from_config(cls, config: dict[str, Any], meta: dict[str, Any]) -> HFCausalLMAdapter:
        """Rebuild the architecture from a checkpoint's config alone (weights are loaded after)."""
        from transformers import CONFIG_MAPPING
        from transformers.initialization import no_init_weights

        hf_dict = dict(config["hf_config"])
        model_type = hf_dict.get("model_type")
        model_cls = cls.model_class(model_type)
        cls.check_config(hf_dict)
        hf_config = CONFIG_MAPPING[model_type].from_dict(hf_dict)
        hf_config._attn_implementation = "sdpa"
        with no_init_weights():  # the checkpoint's weights replace them at once
            model = model_cls(hf_config)
        model.tie_weights()  # skipped under no_init_weights; untied, an optimizer sees 2 params
        model.to(torch_dtype(config.get("dtype", "float32")))
        return cls(model, meta, config.get("block_size"))

    def get_config(self) -> dict[str, Any]:
        return {"hf_config": self.model.config.to_dict(),
                "architecture": type(self.model).__name__,
                "block_size": self.block_size,
                "dtype": dtype_name(self.model.get_input_embeddings().weight.dtype)}

    # -- tokenizer and hook points -----------------------------------------------------

    @property
    def tokenizer(self) -> HFTokenizer:  # type: ignore[override]
        """The native tokenizer, loaded on first use from models/<model_name>/."""
        if self._tokenizer is None:
            folder = self._tokenizer_folder
            name = self.meta.get("model_name")
            if folder is None:
                if not name:
                    raise LmlabError("This model records no model_name, so lmlab cannot find "
                                     "its tokenizer in the registry.")
                folder = resolve(name, self.models_root)["path"]
            self._tokenizer = load_hf_tokenizer(folder, name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok: HFTokenizer) -> None:
        self._tokenizer = tok

    def hook_points(self) -> dict[str, HookPoint]:
        if not hasattr(self, "_hook_points"):
            self._hook_points = collect_hook_points(self.points)
        return self._hook_points

    def shard_units(self) -> list[tuple[nn.Module, str]]:
        """Each decoder layer, run as `layer.lmlab_block`, the method FSDP is told to gather for.

        The adapter never calls `layer(...)` (it runs the layer's parts itself,
        with hook points between them), so FSDP's forward hooks would not fire.
        """
        for layer, points in zip(self.model.model.layers, self.points.blocks, strict=True):
            layer.lmlab_block = functools.partial(self._block, layer, points)
        return [(layer, "lmlab_block") for layer in self.model.model.layers]

    def uses_eager_attention(self, layer: int) -> bool:
        """Whether layer `layer` materialises its scores now (its scores or pattern are hooked)."""
        a = self.points.blocks[layer].attn
        return a.hook_attn_scores.active or a.hook_pattern.active

    # -- forward ------------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(len(self.model.model.layers), self.block_size)

    fuses_loss = True  # forward(idx, targets=y) returns the loss without full logits

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> float32 logits [B, T, vocab]; with a cache, continue at cache.pos.

        With `targets` the mean next-token loss instead: through the chunked head and
        cross-entropy (model/losses.py) unless something hooks hook_logits, which then sees
        the full logits as always.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.block_size:
            raise ValueError(f"{start + T} positions exceed block_size {self.block_size}")
        base, pts = self.model.model, self.points
        x = pts.hook_embed(self._embed(idx))
        ropes = self._rope(x, torch.arange(start, start + T, device=idx.device).unsqueeze(0))
        for i, layer in enumerate(base.layers):
            run = getattr(layer, "lmlab_block", None)  # set when FSDP shards the layer
            x = run(x, ropes[i], cache, i) if run else self._block(layer, pts.blocks[i], x,
                                                                   ropes[i], cache, i)
        if cache is not None:
            cache.pos += T
        x = self._norm(base.norm, pts.ln_final, x)
        if targets is not None and not pts.hook_logits.hooked:
            return linear_cross_entropy(x, self.model.lm_head.weight, targets)
        logits = pts.hook_logits(self.model.lm_head(x)).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    # -- the parts a family may override (Gemma 3: rope, norm and block) ------------------

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings (a family that scales them does it in its embedding module)."""
        return self.model.model.embed_tokens(idx)

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> list[tuple]:
        """(cos, sin) [1, 1, T, hd] of each layer; one shared table for Llama-style models."""
        cos, sin = self.model.model.rotary_emb(x, position_ids)
        return [(cos.unsqueeze(1), sin.unsqueeze(1))] * len(self.model.model.layers)

    def _norm(self, norm: nn.Module, points: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The family's RMSNorm with TL's hook_scale / hook_normalized; Llama: weight * x_hat.

        Every Llama-style norm feeds only linear layers, so under autocast its output is cast
        to autocast's dtype here, once, rather than by each of the 2-3 linears it feeds: the
        same rounding, one copy instead of three.
        """
        out = hooked_norm(x, norm, points, eps=norm.variance_epsilon,
                          gain=lambda h, x: norm.weight * h.to(x.dtype))
        dev = out.device.type
        return out.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else out

    def _block(self, layer: nn.Module, p: _BlockPoints, x: torch.Tensor, rope: tuple,
               cache: KVCache | None, i: int) -> torch.Tensor:
        """A pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
        x = p.hook_resid_pre(x)
        h = self._norm(layer.input_layernorm, p.ln1, x)
        attn_out = p.hook_attn_out(self._attention(layer.self_attn, p.attn, h, rope, cache, i))
        x = p.hook_resid_mid(x + attn_out)
        h = self._norm(layer.post_attention_layernorm, p.ln2, x)
        return p.hook_resid_post(x + p.hook_mlp_out(self._mlp(layer.mlp, p.mlp, h)))

    def _qkv(self, attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [B,T,H,hd], k and v [B,T,Hkv,hd]: the projections, as TL's hook_q/k/v see them."""
        B, T, _ = h.shape
        hd = attn.head_dim
        return (attn.q_proj(h).view(B, T, -1, hd), attn.k_proj(h).view(B, T, -1, hd),
                attn.v_proj(h).view(B, T, -1, hd))

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head q/k norms (Qwen3, Gemma 3) before rotary; none on Llama and Qwen2."""
        if hasattr(attn, "q_norm"):
            return attn.q_norm(q), attn.k_norm(k)
        return q, k

    def _attention(self, attn: nn.Module, p: _AttnPoints, h: torch.Tensor, rope: tuple,
                   cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = h.shape
        q, k, v = self._qkv(attn, h)
        q, k, v = p.hook_q(q), p.hook_k(k), p.hook_v(v)
        q, k = self._qk_norm(attn, q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H,T,hd]
        if hasattr(p, "hook_q_normed"):
            q, k = p.hook_q_normed(q), p.hook_k_normed(k)
        cos, sin = rope
        q = on_heads(p.hook_rot_q, q * cos + _rotate_half(q) * sin)
        k = on_heads(p.hook_rot_k, k * cos + _rotate_half(k) * sin)
        z = attend(q, k, v, p, cache=cache, layer=layer, scale=attn.scaling,
                   window=getattr(attn, "sliding_window", None),
                   dropout=attn.attention_dropout if self.training else 0.0)
        return attn.o_proj(z.reshape(B, T, -1))

    def _mlp(self, mlp: nn.Module, p: _MLPPoints, h: torch.Tensor) -> torch.Tensor:
        """The gated MLP: down(act(gate(h)) * up(h))."""
        pre = p.hook_pre(mlp.gate_proj(h))
        post = p.hook_post(mlp.act_fn(pre) * p.hook_pre_linear(mlp.up_proj(h)))
        return mlp.down_proj(post)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
