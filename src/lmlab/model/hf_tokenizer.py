"""Native tokenizers of imported models behind lmlab's Tokenizer protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError


class HFTokenizer:
    """A Hugging Face tokenizer behind lmlab's Tokenizer protocol.

    `encode` adds no BOS/EOS: a corpus is tokenised in pieces and concatenated,
    and a BOS in front of every piece would teach the model a false pattern.
    `vocab_size` is `len(tokenizer)` (added tokens included), i.e. one past the
    largest id the tokenizer can emit; the model's embedding may be larger.
    """

    def __init__(self, hf_tokenizer: Any, model_name: str | None) -> None:
        self.hf = hf_tokenizer
        self.model_name = model_name
        self.vocab_size = len(hf_tokenizer)
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.bos_token_id = hf_tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the fast tokenizer parallelises this in Rust)."""
        return [list(x) for x in self.hf(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "model_name": self.model_name}

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))


def load_hf_tokenizer(folder: str | Path, model_name: str | None,
                      trust_remote_code: bool = False, gguf_file: str | None = None
                      ) -> HFTokenizer:
    """The native tokenizer stored in a model folder (or inside a .gguf file)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                            gguf_file=gguf_file)
    except (OSError, ValueError) as e:
        raise LmlabError(
            f"No usable tokenizer in {folder} ({str(e).splitlines()[0][:200]}). An imported "
            "model's folder must hold its tokenizer files (tokenizer.json or vocab/merges); "
            "re-import the model with `python main.py import-model`."
        ) from None
    return HFTokenizer(tok, model_name)
