"""A from-scratch character model exported to Hugging Face computes what lmlab computes.

The folder is opened the way a user of transformers opens any model
(AutoModelForCausalLM, AutoTokenizer), and compared with lmlab's own forward
pass, tokenizer and `lmlab sample --greedy` on the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.cli import main
from lmlab.data.tokenizer import CHARS, CharTokenizer
from lmlab.errors import LmlabError
from lmlab.model.adapters import load_adapter
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.export import export_checkpoint
from lmlab.model.transformer import TransformerConfig

PROMPT = "KING:\nWhat light"


pytestmark = pytest.mark.usefixtures("one_thread")


def checkpoint(folder: Path, **model) -> Path:
    """A tiny char model with every weight (biases, norms) moved well off its init, saved."""
    torch.manual_seed(0)
    adapter = CustomTransformerAdapter(TransformerConfig(block_size=32, n_layer=2, n_head=2,
                                                         d_model=32, d_ff=64, **model))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(folder / "ckpt_0000001.pt", adapter, step=1,
                           config={"data": {"block_size": 32}})


ARCH = {"learned": "GPT2LMHeadModel", "sinusoidal": "GPT2LMHeadModel",
        "rotary": "LlamaForCausalLM"}


@pytest.fixture(params=[{}, {"pos_encoding": "sinusoidal", "bias": True},
                        {"pos_encoding": "rotary"}],
                ids=["learned", "sinusoidal-bias", "rotary"])
def exported(request, tmp_path, capsys) -> tuple[Path, Path]:
    """(checkpoint, export folder) of a tiny char model, exported by the CLI."""
    ckpt = checkpoint(tmp_path, **request.param)
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "AutoModelForCausalLM" in capsys.readouterr().out
    return ckpt, out


def test_logits_tokens_and_greedy_text_equal_lmlabs(exported, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = exported
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    adapter, _ = load_adapter(run)
    adapter.eval()
    assert type(model).__name__ == ARCH[adapter.model.cfg.pos_encoding]

    text = PROMPT + " breaks?\n\tIt is the east; " + CHARS  # longer than a window: no warning
    ids = tok.encode(text, verbose=False)
    assert ids == CharTokenizer().encode(text) and tok.decode(ids) == text
    assert tok(text, verbose=False)["input_ids"] == ids  # no special tokens added

    block = adapter.block_size
    idx = torch.randint(0, len(CHARS), (4, block), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # GPT-2 gives exactly our logits; Llama equal up to float rounding
        torch.testing.assert_close(model(idx).logits, adapter(idx), atol=1e-5, rtol=1e-5)

    n = block - len(PROMPT)  # prompt and continuation fill exactly one window
    prompt = torch.tensor([tok.encode(PROMPT)])
    hf_text = tok.decode(model.generate(prompt, max_new_tokens=n, do_sample=False)[0])
    assert main(["sample", "--checkpoint", str(run), "--prompt", PROMPT, "--greedy",
                 "--max-new-tokens", str(n), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == hf_text + "\n"
    assert len(hf_text) == block


def test_rotary_with_biases_is_refused_and_nothing_written(tmp_path):
    """Llama's RMSNorm has no bias: no standard architecture computes this variant exactly."""
    run = checkpoint(tmp_path, pos_encoding="rotary", bias=True)
    with pytest.raises(LmlabError, match="rotary with model.bias true.*Export supports "
                                         "pos_encoding learned or sinusoidal"):
        export_checkpoint(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_speedrun_knobs_are_refused_and_nothing_written(tmp_path):
    run = checkpoint(tmp_path, mlp="relu2", qk_norm=True, pos_encoding="rotary")
    with pytest.raises(LmlabError, match="model.mlp='relu2', model.qk_norm=True: export"):
        export_checkpoint(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_transformerlens_opens_the_export(tmp_path):
    """TL boots the folder like any HF model; its logits are ours up to TL's own rounding."""
    from transformer_lens.model_bridge import TransformerBridge

    for pos in ("learned", "rotary"):
        ckpt = checkpoint(tmp_path / pos, pos_encoding=pos)
        out = export_checkpoint(ckpt, tmp_path / pos / "hf")
        bridge = TransformerBridge.boot_transformers(str(out), device="cpu")
        adapter, _ = load_adapter(ckpt)
        idx = torch.randint(0, len(CHARS), (2, 32), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(bridge(idx), adapter.eval()(idx), atol=1e-4, rtol=1e-4)
