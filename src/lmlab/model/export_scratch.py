"""The from-scratch Transformer as a standard Hugging Face model, with its character tokenizer.

Learned or sinusoidal positions: GPT-2, whose block computes what ours does
(pre-LayerNorm, causal attention scaled by 1/sqrt(head_dim), a GELU MLP, a
final LayerNorm, a head tied to the token embedding). The export is a renaming
(GPT-2's Conv1D stores weights transposed), with zero biases where ours has
none, `activation_function: gelu` (exact erf GELU, not GPT-2's tanh one) and
LayerNorm eps 1e-5 (nn.LayerNorm's). A sinusoidal table is a fixed position
table, so it becomes GPT-2's `wpe`.

Rotary positions: Llama, made to compute our function exactly (up to float
rounding) by three identities rather than approximations:
- LayerNorm is RMSNorm of a zero-mean vector, and adding a constant to every
  entry of the residual stream changes no LayerNorm output. So every write into
  the stream (the embedding, each attention and MLP output projection) is
  centred, the stream is then zero-mean at every position, and Llama's RMSNorm
  with our LayerNorm gains gives our outputs. The head keeps the uncentred
  embedding (untied), so the logits are ours too. (TransformerLens centres
  writing weights the same way.) Needs bias-free norms: `model.bias: false`.
- Our MLP is proj(gelu(fc x)); Llama's is down(act(gate x) * up x). With
  `hidden_act: gelu`, gate = fc, and up = weight 0 plus bias 1 (`mlp_bias`),
  the product is exactly gelu(fc x).
- Our rotary turns pairs (0,1), (2,3)...; Llama's rotate_half turns (i, i+d/2).
  Permuting each head's q and k rows (even ones first, then odd) makes them
  the same rotation; q.k is unchanged by the shared permutation.
The residual stream of the export is therefore our stream minus its mean per
position: logits match, hook-level residual activations differ by that mean.

The vocabulary becomes a `tokenizers` WordLevel model over our 97 characters
in our id order, split into single characters, with no normaliser and no
special tokens, so `AutoTokenizer` gives our ids and decodes them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmlab.data.tokenizer import CHARS
from lmlab.errors import LmlabError

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, what the from-scratch model uses
ROPE_THETA = 10000.0  # the base of transformer.rotary_tables
SUPPORTED = ("pos_encoding learned or sinusoidal (as GPT-2), or rotary with model.bias false "
             "(as Llama)")


def gpt2_config(cfg: dict[str, Any], dtype: torch.dtype) -> Any:
    """The GPT2Config that computes what a from-scratch model of config `cfg` computes."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"], n_embd=cfg["d_model"],
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_inner=cfg["d_ff"],
        activation_function="gelu", layer_norm_epsilon=LAYER_NORM_EPS,
        resid_pdrop=cfg["dropout"], embd_pdrop=cfg["dropout"], attn_pdrop=cfg["dropout"],
        scale_attn_weights=True, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype=str(dtype)[6:],
        architectures=["GPT2LMHeadModel"])


def gpt2_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our Transformer's weights under GPT-2's names and layouts (zeros for absent biases)."""
    ours = dict(model.state_dict())
    cfg = model.cfg

    def bias(name: str, n: int) -> torch.Tensor:
        return ours.get(name, torch.zeros(n, dtype=ours["wte.weight"].dtype))

    positions = ours["wpe.weight"] if cfg.pos_encoding == "learned" else model.sinusoid
    out = {"transformer.wte.weight": ours["wte.weight"],
           "transformer.wpe.weight": positions.to(ours["wte.weight"].dtype),
           "transformer.ln_f.weight": ours["ln_final.weight"],
           "transformer.ln_f.bias": bias("ln_final.bias", cfg.d_model),
           "lm_head.weight": ours["wte.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b, n in (("ln_1", "ln_1", cfg.d_model), ("ln_2", "ln_2", cfg.d_model)):
            out[f"{dst}{b}.weight"] = ours[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = bias(f"{src}{a}.bias", n)
        for a, b, n in (("attn.qkv", "attn.c_attn", 3 * cfg.d_model),
                        ("attn.proj", "attn.c_proj", cfg.d_model),
                        ("mlp.fc", "mlp.c_fc", cfg.d_ff), ("mlp.proj", "mlp.c_proj", cfg.d_model)):
            out[f"{dst}{b}.weight"] = ours[f"{src}{a}.weight"].t().contiguous()  # Conv1D: [in, out]
            out[f"{dst}{b}.bias"] = bias(f"{src}{a}.bias", n)
    return out


def llama_config(cfg: dict[str, Any], dtype: torch.dtype) -> Any:
    """The LlamaConfig that computes what a bias-free rotary model of config `cfg` computes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_ff"],
        num_hidden_layers=cfg["n_layer"], num_attention_heads=cfg["n_head"],
        num_key_value_heads=cfg["n_head"], head_dim=cfg["d_model"] // cfg["n_head"],
        hidden_act="gelu", max_position_embeddings=cfg["block_size"],
        rms_norm_eps=LAYER_NORM_EPS, rope_parameters={"rope_type": "default",
                                                      "rope_theta": ROPE_THETA},
        attention_bias=False, mlp_bias=True, tie_word_embeddings=False,
        attention_dropout=cfg["dropout"], bos_token_id=None, eos_token_id=None,
        pad_token_id=None, dtype=str(dtype)[6:], architectures=["LlamaForCausalLM"])


def llama_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our bias-free rotary Transformer's weights as Llama's (see the module docstring)."""
    ours = dict(model.state_dict())
    cfg = model.cfg
    hd = cfg.d_model // cfg.n_head
    # within each head, our rows (0, 1, 2, 3, ...) as (0, 2, ..., 1, 3, ...): rotate_half's order
    rows = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    rows = (torch.arange(cfg.n_head)[:, None] * hd + rows).flatten()

    def centred(w: torch.Tensor, dim: int) -> torch.Tensor:
        return w - w.mean(dim=dim, keepdim=True)

    wte = ours["wte.weight"]
    out = {"model.embed_tokens.weight": centred(wte, 1), "lm_head.weight": wte.clone(),
           "model.norm.weight": ours["ln_final.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = ours[f"{src}attn.qkv.weight"].chunk(3, dim=0)
        fc = ours[f"{src}mlp.fc.weight"]
        out.update({
            f"{dst}input_layernorm.weight": ours[f"{src}ln_1.weight"],
            f"{dst}post_attention_layernorm.weight": ours[f"{src}ln_2.weight"],
            f"{dst}self_attn.q_proj.weight": q[rows], f"{dst}self_attn.k_proj.weight": k[rows],
            f"{dst}self_attn.v_proj.weight": v.clone(),
            f"{dst}self_attn.o_proj.weight": centred(ours[f"{src}attn.proj.weight"], 0),
            f"{dst}mlp.gate_proj.weight": fc, f"{dst}mlp.gate_proj.bias": fc.new_zeros(cfg.d_ff),
            f"{dst}mlp.up_proj.weight": torch.zeros_like(fc),
            f"{dst}mlp.up_proj.bias": fc.new_ones(cfg.d_ff),
            f"{dst}mlp.down_proj.weight": centred(ours[f"{src}mlp.proj.weight"], 0),
            f"{dst}mlp.down_proj.bias": fc.new_zeros(cfg.d_model)})
    return out


NANOGPT_DEFAULTS = {"norm": "layernorm", "mlp": "gelu", "qk_norm": False, "tie_embeddings": True,
                    "logit_softcap": None, "value_embed": False, "embed_skip": False}


def hf_model(model: torch.nn.Module) -> Any:
    """The transformers model (GPT-2 or Llama) that computes what our Transformer computes."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cfg, dtype = model.cfg, model.wte.weight.dtype
    knobs = [f"model.{k}={v!r}" for k, v in cfg.to_dict().items()
             if k in NANOGPT_DEFAULTS and v != NANOGPT_DEFAULTS[k]]
    if knobs:  # the speedrun knobs (zero_init_proj only sets the start, so it exports)
        raise LmlabError(f"Cannot export a model with {', '.join(knobs)}: export writes "
                         "nanoGPT's architecture; retrain with those knobs at their defaults.")
    if cfg.pos_encoding in ("learned", "sinusoidal"):
        cls, config, state = GPT2LMHeadModel, gpt2_config, gpt2_state_dict
    elif cfg.pos_encoding == "rotary" and not cfg.bias:
        cls, config, state = LlamaForCausalLM, llama_config, llama_state_dict
    else:
        what = "rotary with model.bias true" if cfg.pos_encoding == "rotary" else \
            f"pos_encoding '{cfg.pos_encoding}'"
        raise LmlabError(f"Cannot export a model with {what}: no standard Hugging Face "
                         f"architecture computes it exactly. Export supports {SUPPORTED}.")
    hf = cls(config(cfg.to_dict(), dtype)).to(dtype)
    hf.load_state_dict(state(model), strict=True)
    return hf.eval()


def char_tokenizer(block_size: int) -> Any:
    """Our character vocabulary as a fast tokenizer: same ids, no special tokens, exact decode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=block_size)


def export_scratch(adapter: Any, out: Path) -> None:
    """Write the from-scratch adapter's model and tokenizer to `out` (created) as GPT-2/Llama."""
    model = adapter.model
    hf = hf_model(model)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    char_tokenizer(model.cfg.block_size).save_pretrained(str(out))
    # the class name every transformers version knows (v5 would write its own alias)
    config = out / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")


def scratch_model_card(adapter: Any, ckpt: dict[str, Any]) -> str:
    """README.md for an exported from-scratch model: what it is, how it was trained, its limits."""
    cfg = adapter.model.cfg
    if cfg.pos_encoding == "rotary":
        arch, how = "Llama", ("LayerNorm as RMSNorm of a mean-centred residual stream, untied "
                              "head, the GELU MLP as a gated one with up_proj = 1, q/k rows "
                              "permuted for rotate_half")
    else:
        arch, how = "GPT-2", ("zero biases" if not cfg.bias else "with biases") + \
            ", tied head, LayerNorm eps 1e-5"
    data = (ckpt.get("config") or {}).get("data", {})
    lines = ["---", "library_name: transformers", "tags:", "- lmlab", "- character-level",
             "- from-scratch", "---", "",
             "# A character-level model trained from scratch with lmlab", "",
             f"Exported by lmlab from checkpoint `{Path(ckpt.get('path', '?')).name}` "
             f"(run `{ckpt.get('run_id', '?')}`, step {ckpt.get('step', '?')}).", "",
             f"- Architecture: {arch} ({cfg.n_layer} layers, {cfg.n_head} heads, d_model "
             f"{cfg.d_model}, d_ff {cfg.d_ff}), exact GELU, {cfg.pos_encoding} positions: "
             f"the function lmlab computes ({how}).",
             f"- Context: {cfg.block_size} characters (generate within one window).",
             "- Tokenizer: one token per character, 97 characters (printable ASCII, newline, "
             "tab), no special tokens; other characters cannot be encoded."]
    if data.get("path"):
        lines.append(f"- Training data: `{data['path']}`")
    return "\n".join(lines) + "\n"
