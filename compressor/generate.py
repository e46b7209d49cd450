"""Text generation with the inference cache: one prefill pass over the prompt, then one token per step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from compressor.model import HybridLM


@torch.inference_mode()
def generate(
    model: HybridLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Continue each prompt of `input_ids` (batch, prompt_len) by up to `max_new_tokens` tokens.

    temperature 0 is greedy; otherwise sample from softmax(logits / temperature), optionally restricted
    to the `top_k` most likely tokens and/or the smallest set holding `top_p` of the probability. A
    sequence that emits `eos_token_id` keeps emitting it; generation stops when all have. `stop`, called
    after each step with the tokens generated so far (batch, steps), returns a bool (batch,) marking the
    sequences that are finished too (stop strings); those continue with `eos_token_id` when given.
    `on_token` is called with each step's tokens (batch,) as they are picked (a stream of the text).
    Returns (batch, prompt_len + generated) token ids.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be (batch, prompt_len) with prompt_len >= 1")
    batch, prompt_len = input_ids.shape
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    cache = model.allocate_cache(batch, prompt_len + max_new_tokens)
    logits = model(input_ids, cache, last_only=True)[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = [input_ids]
    for step in range(max_new_tokens):
        token = _pick(logits.float(), temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if stop is not None:
            done |= stop(torch.cat(out[1:], dim=1)).to(device)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache)[:, -1]
    return torch.cat(out, dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
