"""The from-scratch Transformer as a Hugging Face GPT-2 folder, with its character tokenizer.

GPT-2's block computes what ours does: pre-LayerNorm, causal attention scaled
by 1/sqrt(head_dim), a GELU MLP, a final LayerNorm and a head tied to the token
embedding. So the export is a renaming (GPT-2's Conv1D stores weights
transposed), with zero biases where ours has none, `activation_function: gelu`
(exact erf GELU, not GPT-2's tanh one) and LayerNorm eps 1e-5 (nn.LayerNorm's).
A sinusoidal table is a fixed position table, so it becomes GPT-2's `wpe`.
Rotary positions have no standard architecture with our LayerNorm and GELU MLP
(Llama's RMSNorm and gated MLP differ), so they are refused, never approximated.

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
EXPORTABLE = ("learned", "sinusoidal")


def gpt2_config(cfg: dict[str, Any], dtype: torch.dtype) -> Any:
    """The GPT2Config that computes what a from-scratch model of config `cfg` computes."""
    from transformers import GPT2Config

    if cfg["pos_encoding"] not in EXPORTABLE:
        raise LmlabError(
            f"Cannot export a model with pos_encoding '{cfg['pos_encoding']}': no standard "
            "Hugging Face architecture computes it with our LayerNorm and GELU MLP. Export "
            f"supports pos_encoding {' or '.join(EXPORTABLE)} (as GPT-2).")
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
    """Write the from-scratch adapter's model and tokenizer to `out` (created) as GPT-2."""
    from transformers import GPT2LMHeadModel

    model = adapter.model
    dtype = model.wte.weight.dtype
    hf = GPT2LMHeadModel(gpt2_config(model.cfg.to_dict(), dtype)).to(dtype)
    hf.load_state_dict(gpt2_state_dict(model), strict=True)
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
    data = (ckpt.get("config") or {}).get("data", {})
    lines = ["---", "library_name: transformers", "tags:", "- lmlab", "- character-level",
             "- from-scratch", "---", "",
             "# A character-level model trained from scratch with lmlab", "",
             f"Exported by lmlab from checkpoint `{Path(ckpt.get('path', '?')).name}` "
             f"(run `{ckpt.get('run_id', '?')}`, step {ckpt.get('step', '?')}).", "",
             f"- Architecture: GPT-2 ({cfg.n_layer} layers, {cfg.n_head} heads, d_model "
             f"{cfg.d_model}, d_ff {cfg.d_ff}), exact GELU, "
             f"{'biases' if cfg.bias else 'zero biases'}, {cfg.pos_encoding} positions, "
             "tied head: the same function lmlab computes.",
             f"- Context: {cfg.block_size} characters (generate within one window).",
             "- Tokenizer: one token per character, 97 characters (printable ASCII, newline, "
             "tab), no special tokens; other characters cannot be encoded."]
    if data.get("path"):
        lines.append(f"- Training data: `{data['path']}`")
    return "\n".join(lines) + "\n"
