"""The hook vocabulary: what each point name means, its shape and its TransformerLens twin.

A name means the same activation on every model (the from-scratch one and every
imported family) and, where TransformerLens has the name, the activation TL
caches under it (checked by tests/model/test_transformerlens_oracle.py against
TransformerLens 4.3's TransformerBridge without weight processing). `lmlab
hooks list` prints this table for the points a model has.
"""

from __future__ import annotations

from typing import NamedTuple

RESID = "[batch, pos, d_model]"


class Point(NamedTuple):
    shape: str
    tl: str | None  # TransformerLens's name for the same activation; None: it has none
    meaning: str
    tl_note: str = ""  # where TL's versions differ about the twin


def _norm(name: str, where: str) -> dict[str, Point]:
    return {
        f"{name}.hook_scale": Point("[batch, pos, 1]", f"{name}.hook_scale",
                                    f"sqrt(mean(x^2) + eps) of the {where} norm (x centred "
                                    "for LayerNorm)"),
        f"{name}.hook_normalized": Point(RESID, f"{name}.hook_normalized",
                                         f"x / scale of the {where} norm, BEFORE its gain"),
    }


VOCABULARY: dict[str, Point] = {
    "hook_embed": Point(RESID, "hook_embed", "token embeddings (Gemma: times sqrt(d_model))"),
    "hook_pos_embed": Point(RESID, "hook_pos_embed",
                            "learned/sinusoidal position embeddings (absent with rotary)"),
    "blocks.{i}.hook_resid_pre": Point(RESID, "blocks.{i}.hook_resid_pre", "block input"),
    **_norm("blocks.{i}.ln1", "pre-attention"),
    "blocks.{i}.attn.hook_q": Point("[batch, pos, head, d_head]", "blocks.{i}.attn.hook_q",
                                    "query projection, before q-norm and rotary"),
    "blocks.{i}.attn.hook_k": Point("[batch, pos, kv_head, d_head]", "blocks.{i}.attn.hook_k",
                                    "key projection, before k-norm and rotary"),
    "blocks.{i}.attn.hook_v": Point("[batch, pos, kv_head, d_head]", "blocks.{i}.attn.hook_v",
                                    "value projection"),
    "blocks.{i}.attn.hook_q_normed": Point("[batch, head, pos, d_head]",
                                           "blocks.{i}.attn.hook_q_normed",
                                           "query after q-norm (Qwen3, Gemma 3), before rotary; "
                                           "heads before positions, as TL 4 has it"),
    "blocks.{i}.attn.hook_k_normed": Point("[batch, kv_head, pos, d_head]",
                                           "blocks.{i}.attn.hook_k_normed",
                                           "key after k-norm (Qwen3, Gemma 3), before rotary"),
    "blocks.{i}.attn.hook_rot_q": Point("[batch, pos, head, d_head]",
                                        "blocks.{i}.attn.hook_rot_q",
                                        "query after rotary (rotary models only)"),
    "blocks.{i}.attn.hook_rot_k": Point("[batch, pos, kv_head, d_head]",
                                        "blocks.{i}.attn.hook_rot_k",
                                        "key after rotary (rotary models only)"),
    "blocks.{i}.attn.hook_attn_scores": Point("[batch, head, q_pos, k_pos]",
                                              "blocks.{i}.attn.hook_attn_scores",
                                              "scaled scores after the causal (and sliding-"
                                              "window) mask: masked entries are -inf"),
    "blocks.{i}.attn.hook_pattern": Point("[batch, head, q_pos, k_pos]",
                                          "blocks.{i}.attn.hook_pattern",
                                          "softmax of the scores, before dropout"),
    "blocks.{i}.attn.hook_z": Point("[batch, pos, head, d_head]", "blocks.{i}.attn.hook_z",
                                    "pattern @ v per head, the input of the output projection"),
    "blocks.{i}.hook_attn_out": Point(RESID, "blocks.{i}.hook_attn_out",
                                      "attention output as added to the stream (Gemma: "
                                      "after its post-norm)"),
    **_norm("blocks.{i}.ln1_post", "post-attention (Gemma 3)"),
    "blocks.{i}.hook_resid_mid": Point(RESID, "blocks.{i}.hook_resid_mid",
                                       "residual stream between attention and MLP"),
    **_norm("blocks.{i}.ln2", "pre-MLP"),
    "blocks.{i}.mlp.hook_pre": Point("[batch, pos, d_mlp]", "blocks.{i}.mlp.hook_pre",
                                     "MLP input projection (gated MLPs: the gate), before "
                                     "the activation"),
    "blocks.{i}.mlp.hook_pre_linear": Point("[batch, pos, d_mlp]",
                                            "blocks.{i}.mlp.hook_pre_linear",
                                            "up projection of a gated MLP"),
    "blocks.{i}.mlp.hook_post": Point("[batch, pos, d_mlp]", "blocks.{i}.mlp.hook_post",
                                      "activation (times up projection if gated), the input "
                                      "of the down projection"),
    "blocks.{i}.hook_mlp_out": Point(RESID, "blocks.{i}.hook_mlp_out",
                                     "MLP output as added to the stream (Gemma: after "
                                     "its post-norm)"),
    **_norm("blocks.{i}.ln2_post", "post-MLP (Gemma 3)"),
    "blocks.{i}.hook_resid_post": Point(RESID, "blocks.{i}.hook_resid_post", "block output"),
    **_norm("ln_final", "final"),
    "hook_logits": Point("[batch, pos, d_vocab]", "hook_unembed", "logits",
                         "TransformerBridge only; HookedTransformer had none"),
}


def describe(name: str) -> Point | None:
    """The vocabulary entry of a point name, with block indices collapsed to {i}."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        name = ".".join(["blocks", "{i}", *parts[2:]])
    return VOCABULARY.get(name)


def tl_name(name: str) -> str | None:
    """TransformerLens's name for point `name` (e.g. blocks.3.attn.hook_q), or None."""
    point = describe(name)
    if point is None or point.tl is None:
        return None
    parts = name.split(".")
    return point.tl.replace("{i}", parts[1]) if "{i}" in point.tl else point.tl
