"""Sampling text from a GPT: temperature, top-k and top-p, with a KV cache.

Pure PyTorch like the model. The context is the prompt plus everything generated; once it would
exceed `max_seq_len`, it restarts from its last `max_seq_len // 2` tokens (and the cache is rebuilt
from them), so every step sees at least half a window of history and the cached and uncached paths
compute the same thing: with the same generator they draw the same tokens.

A model that is not causal (`model.norm=seq_layernorm`, the original runs' norm over the whole
window) is run as it was trained: on the whole window for every new character, without a cache
(every position's activations change when a character joins the window), the window sliding by one
character once it is full. Its training saw every window's later characters; sampling cannot, so
its samples are worse than its val loss suggests.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from shakegpt.errors import ConfigError
from shakegpt.model import GPT, KVCache
from shakegpt.sampling import TEMPERATURE, TOP_K, TOP_P, check_sampling
from shakegpt.tokenizer import CharTokenizer


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> one sampled id per row, (B, 1)."""
    # shifted so the largest logit is 0 before dividing: a tiny temperature gives -inf for the others
    # (greedy choice) instead of inf - inf = nan
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # keep the smallest set of most likely ids whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this id already reached top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def stream(
    model: GPT,
    prompt: torch.Tensor,
    num_tokens: int,
    *,
    temperature: float = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    generator: torch.Generator | None = None,
    num_allowed: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield `num_tokens` sampled ids, (B, 1) each, after `prompt` (B, T). Only ids below
    `num_allowed` are drawn (a tokenizer's `<unk>` never is)."""
    check_sampling(temperature, top_k, top_p)
    window = model.cfg.max_seq_len
    if prompt.size(1) > window:
        raise ConfigError(
            f"the prompt has {prompt.size(1)} characters, more than the model's context of "
            f"model.max_seq_len={window}; shorten it"
        )
    if prompt.size(1) == 0:
        raise ConfigError("the prompt is empty; give at least one character, e.g. a newline")
    was_training = model.training
    causal = model.cfg.causal
    use_cache = use_cache and causal
    model.eval()
    try:
        ctx, cache = prompt, None
        for _ in range(num_tokens):
            if not use_cache:
                logits = model(ctx)
            elif cache is None:  # (re)fill the cache with the whole context
                cache = KVCache(model.cfg.n_layer, window)
                logits = model(ctx, 0, cache)
            else:  # only the newest token goes through the model
                logits = model(ctx[:, -1:], len(cache), cache)
            nxt = sample_next(
                logits[:, -1, :num_allowed], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            yield nxt
            ctx = torch.cat((ctx, nxt), dim=1)
            if ctx.size(1) > window and not causal:  # the whole window, one character further on
                ctx = ctx[:, -window:]
            elif ctx.size(1) > window:
                ctx, cache = ctx[:, -max(1, window // 2) :], None
    finally:
        model.train(was_training)


def generate(model: GPT, prompt: torch.Tensor, num_tokens: int, **kwargs) -> torch.Tensor:
    """`prompt` (B, T) followed by `num_tokens` sampled ids: (B, T + num_tokens). See `stream`."""
    return torch.cat([prompt, *stream(model, prompt, num_tokens, **kwargs)], dim=1)


def stream_text(
    model: GPT,
    tokenizer: CharTokenizer,
    prompt: str,
    num_chars: int,
    *,
    temperature: float = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[str]:
    """Yield the characters sampled after `prompt`, one at a time. Characters of the prompt outside
    the vocabulary become `<unk>`; the same seed gives the same text."""
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
    idx = tokenizer.encode(prompt)[None].to(device)
    sampled = stream(
        model,
        idx,
        num_chars,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        num_allowed=tokenizer.unk_id,
        use_cache=use_cache,
    )
    for nxt in sampled:
        yield tokenizer.decode(nxt[0])
