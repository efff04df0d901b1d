"""Text generation: greedy, temperature, top-k and top-p, seedable, with a KV cache.

With the cache each new token costs one position. When the cache holds a full
window, generation re-reads the most recent half window into a fresh cache and
goes on, so every forward pass is a window that starts at position 0, as in
training (sliding the cache instead would feed later layers keys computed from
context that has left the window).
"""

from __future__ import annotations

import torch

from lmlab.errors import LmlabError


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, greedy: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits [B, V] -> next token ids [B, 1]."""
    if greedy or temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(adapter: torch.nn.Module, prompt: list[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             greedy: bool = False, seed: int | None = None, use_cache: bool = True) -> list[int]:
    """Continue `prompt` by `max_new_tokens` tokens; returns only the new tokens."""
    if not prompt:
        raise LmlabError("The prompt is empty: give at least one character (e.g. a newline).")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (
            top_k is not None and top_k < 1):
        raise LmlabError("Need temperature >= 0, top_k >= 1 and 0 < top_p <= 1.")
    was_training = adapter.training
    adapter.eval()
    device = next(adapter.parameters()).device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()  # this generator only: the global RNG, which training owns, is untouched
    block = adapter.block_size
    tokens = list(prompt)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits[:, -1], temperature, top_k, top_p, greedy, gen)

    def as_tensor(ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=device)

    if not use_cache:
        for _ in range(max_new_tokens):
            tokens.append(int(pick(adapter(as_tensor(tokens[-block:])))))
    else:
        cache = adapter.new_cache(1)
        logits = adapter(as_tensor(tokens[-block:]), cache=cache)
        for i in range(max_new_tokens):
            nxt = pick(logits)
            tokens.append(int(nxt))
            if i == max_new_tokens - 1:
                break
            if cache.pos >= cache.capacity:
                cache.reset()
                logits = adapter(as_tensor(tokens[-(block // 2):]), cache=cache)
            else:
                logits = adapter(nxt, cache=cache)
    adapter.train(was_training)
    return tokens[len(prompt):]
