"""Shared Hugging Face plumbing for the adapters of imported models.

`HFCausalLMAdapter` runs a Llama-style decoder (Llama, Qwen2, Qwen3, ...) by
calling the Hugging Face model's *own* submodules in the same order as its
forward: the weights, their names and `save_pretrained` / `from_pretrained`
stay exactly Hugging Face's, while every TransformerLens-named `HookPoint` sits
on the activation it names. That is why a forward hook on, say,
`blocks.0.hook_attn_out` can see and replace the attention output of an imported
Qwen exactly as it does on the from-scratch model. Attention uses PyTorch's
fused kernel unless `hook_attn_scores` or `hook_pattern` of that layer is
hooked; only then are the scores materialised (the "eager" path).

A family adapter (one file in `model/adapters/`) names its `model_type`s and
Hugging Face classes and, where the family differs, overrides a small method
(Qwen3's per-head q/k norms are `_qk_norm`).

Also here: the KV cache wrapper (`HFKVCache`, around transformers'
`DynamicCache`) and dtype helpers (the tokenizer is in `model/tokenizers.py`). Weights
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
from lmlab.model.points import HookPoint, collect_hook_points
from lmlab.model.registry import model_dir, resolve, verify_weights
from lmlab.model.tokenizers import HFTokenizer, load_hf_tokenizer

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


# --- KV cache -------------------------------------------------------------------------


class HFKVCache:
    """transformers' `DynamicCache` with lmlab's KVCache interface (pos, capacity, sliding, reset).

    Keys are stored after rotary embedding at absolute positions, and the
    Hugging Face models are run only within their trained context, so the cache
    does not slide: once `capacity` (the adapter's block size) is reached the
    sampler starts a fresh window, as for the from-scratch model's absolute positions.
    """

    sliding = False

    def __init__(self, capacity: int) -> None:
        from transformers import DynamicCache

        self._cls = DynamicCache
        self.inner = DynamicCache()
        self.capacity = capacity
        self.pos = 0

    @property
    def length(self) -> int:
        return self.pos

    def reset(self) -> None:
        self.inner = self._cls()
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner.update(k, v, layer)


# --- hook points ----------------------------------------------------------------------


class _AttnPoints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # [B,T,H,hd]
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()  # [B,H,Tq,Tk]
        self.hook_z = HookPoint()  # [B,T,H,hd]


class _MLPPoints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_pre = HookPoint()  # gate projection, before the activation
        self.hook_post = HookPoint()  # act(gate) * up, the input of down_proj


class _BlockPoints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_pre, self.hook_resid_mid = HookPoint(), HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()
        self.attn, self.mlp = _AttnPoints(), _MLPPoints()


class _FinalPoints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_normalized = HookPoint()


class HookTree(nn.Module):
    """The HookPoints of an n-layer decoder, laid out so module paths are the shared names.

    It holds no parameters, so the Hugging Face model's state_dict is untouched.
    """

    def __init__(self, n_layer: int) -> None:
        super().__init__()
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(_BlockPoints() for _ in range(n_layer))
        self.ln_final = _FinalPoints()
        self.hook_logits = HookPoint()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


# --- the adapter ----------------------------------------------------------------------


class HFCausalLMAdapter(BaseAdapter):
    """A Llama-style Hugging Face causal LM behind BaseAdapter (subclassed per family)."""

    # model_type -> transformers class name; a family adapter fills this in
    hf_classes: ClassVar[dict[str, str]] = {}

    def __init__(self, hf_model: nn.Module, meta: dict[str, Any],
                 block_size: int | None = None) -> None:
        super().__init__()
        self.model = hf_model
        cfg = hf_model.config
        self.block_size = int(block_size or cfg.max_position_embeddings)
        self.meta = {"model_name": None, "model_id": None, "model_source": None,
                     "fine_tuned_from": None, "architecture_type": cfg.model_type, **meta}
        self.points = HookTree(cfg.num_hidden_layers)
        self._tokenizer: HFTokenizer | None = None
        self._tokenizer_folder: Path | None = None

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
    def from_folder(cls, folder: str | Path, meta: dict[str, Any],
                    dtype: str | torch.dtype | None = "float32",
                    block_size: int | None = None) -> HFCausalLMAdapter:
        """Load a Hugging Face folder's weights (float32 unless `dtype` says otherwise)."""
        folder = Path(folder)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise LmlabError(f"{folder} has no config.json, so it is not a Hugging Face model "
                             "folder. Re-import the model with `python main.py import-model`.")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        model_cls = cls.model_class(model_type)
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
                folder = resolve(name)["path"]
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

    def new_cache(self, batch_size: int) -> HFKVCache:
        return HFKVCache(self.block_size)

    def forward(self, idx: torch.Tensor, cache: HFKVCache | None = None) -> torch.Tensor:
        """Token ids [B, T] -> float32 logits [B, T, vocab]; with a cache, continue at cache.pos."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.block_size:
            raise ValueError(f"{start + T} positions exceed block_size {self.block_size}")
        base, pts = self.model.model, self.points
        x = pts.hook_embed(base.embed_tokens(idx))
        position_ids = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        cos, sin = base.rotary_emb(x, position_ids)
        rope = (cos.unsqueeze(1), sin.unsqueeze(1))
        for i, layer in enumerate(base.layers):
            run = getattr(layer, "lmlab_block", None)  # set when FSDP shards the layer
            x = run(x, rope, cache, i) if run else self._block(layer, pts.blocks[i], x, rope,
                                                               cache, i)
        if cache is not None:
            cache.pos += T
        x = pts.ln_final.hook_normalized(base.norm(x))
        return pts.hook_logits(self.model.lm_head(x)).float()

    def _block(self, layer: nn.Module, p: _BlockPoints, x: torch.Tensor, rope: tuple,
               cache: HFKVCache | None, i: int) -> torch.Tensor:
        x = p.hook_resid_pre(x)
        attn_out = self._attention(layer.self_attn, p.attn, layer.input_layernorm(x), rope,
                                   cache, i)
        x = p.hook_resid_mid(x + p.hook_attn_out(attn_out))
        mlp, h = layer.mlp, layer.post_attention_layernorm(x)
        pre = p.mlp.hook_pre(mlp.gate_proj(h))
        post = p.mlp.hook_post(mlp.act_fn(pre) * mlp.up_proj(h))
        return p.hook_resid_post(x + p.hook_mlp_out(mlp.down_proj(post)))

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-family treatment of q and k [B,T,H,hd] before rotary; Llama/Qwen2: none."""
        return q, k

    def _attention(self, attn: nn.Module, p: _AttnPoints, h: torch.Tensor, rope: tuple,
                   cache: HFKVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = h.shape
        hd = attn.head_dim
        q = attn.q_proj(h).view(B, T, -1, hd)
        k = attn.k_proj(h).view(B, T, -1, hd)
        v = attn.v_proj(h).view(B, T, -1, hd)
        q, k = self._qk_norm(attn, q, k)
        q, k, v = p.hook_q(q), p.hook_k(k), p.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H,T,hd]
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)
        Tk = k.size(2)
        n_rep = q.size(1) // k.size(1)
        window = getattr(attn, "sliding_window", None)
        mask = None  # queries are the last T of Tk positions
        if (1 < T < Tk) or (window is not None and Tk > window):
            qpos = torch.arange(Tk - T, Tk, device=h.device)[:, None]
            kpos = torch.arange(Tk, device=h.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask = mask & (qpos - kpos < window)
        dropout = attn.attention_dropout if self.training else 0.0
        if p.hook_attn_scores.active or p.hook_pattern.active:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
            scores = (q @ k.transpose(-2, -1)) * attn.scaling
            if mask is None and T > 1:
                mask = torch.ones(T, Tk, dtype=torch.bool, device=h.device).tril(Tk - T)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            scores = p.hook_attn_scores(scores)
            if mask is not None:  # a hook must not let a query see the future
                scores = scores.masked_fill(~mask, float("-inf"))
            pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            pattern = p.hook_pattern(pattern)
            z = F.dropout(pattern, dropout, self.training) @ v
        else:
            if n_rep > 1 and mask is not None:
                k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=T > 1 and mask is None,
                scale=attn.scaling, enable_gqa=n_rep > 1 and mask is None)
        z = p.hook_z(z.transpose(1, 2))
        return attn.o_proj(z.reshape(B, T, -1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
