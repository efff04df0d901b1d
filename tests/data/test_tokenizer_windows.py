import numpy as np
import pytest
import torch

from lmlab.data.batcher import Batcher, RandomBatcher, eval_batches
from lmlab.data.sequences import IGNORE_INDEX, SequenceBuilder
from lmlab.data.tokenizer import CHARS, CharTokenizer
from lmlab.errors import LmlabError


def test_round_trip_is_exact_for_every_allowed_character():
    tok = CharTokenizer()
    text = CHARS + CHARS[::-1] + "Hello,\tworld!\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 97 == len(set(tok.encode(CHARS)))


def test_vocabulary_does_not_depend_on_the_corpus():
    tok = CharTokenizer()
    assert tok.encode("a") == CharTokenizer().encode("a")
    assert tok.spec() == {"kind": "char", "chars": CHARS}


def test_character_outside_vocabulary_is_named():
    with pytest.raises(LmlabError, match=r"'é'.*U\+00E9.*position 3"):
        CharTokenizer().encode("caf\u00e9")
    with pytest.raises(LmlabError, match="position 1"):
        CharTokenizer().encode("a\x07b")


def test_windows_are_shifted_by_one():
    seqs = SequenceBuilder(list(range(600)), block_size=256)
    x, y = seqs.window(10)
    assert len(x) == len(y) == 256
    assert x[0] == 10 and y == [t + 1 for t in x]
    pairs = list(seqs)
    assert all(len(px) == 256 for px, _ in pairs)


def test_too_short_sequence_is_an_error():
    with pytest.raises(LmlabError, match="holds 256 tokens.*needs 257"):
        SequenceBuilder(list(range(256)), block_size=256)


def test_ordered_windows_score_every_target_exactly_once():
    tokens = np.arange(1000, dtype=np.uint16)
    seen = []
    for x, y in eval_batches(tokens, 64, 5, "cpu"):
        assert x.shape[1] == 64 and x.dtype == torch.int64
        seen += y[y != IGNORE_INDEX].tolist()
    assert sorted(seen) == list(range(1, 1000))


def test_batcher_gives_seed_interface_shapes():
    pairs = SequenceBuilder(list(range(2000)), 256)
    x, y = next(iter(Batcher(pairs, batch_size=3)))
    assert x.shape == y.shape == (3, 256) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_random_batcher_resumes_exactly():
    tokens = np.arange(5000, dtype=np.uint16) % 97
    a = RandomBatcher(tokens, 32, 4, "cpu", seed=1)
    a.next()
    state = a.state_dict()
    expected = [a.next()[0] for _ in range(3)]
    b = RandomBatcher(tokens, 32, 4, "cpu", seed=1)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next()[0]) for e in expected)
    other_rank = RandomBatcher(tokens, 32, 4, "cpu", seed=1, rank=1)
    assert not torch.equal(other_rank.next()[0], RandomBatcher(tokens, 32, 4, "cpu", 1).next()[0])
