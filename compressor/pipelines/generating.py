"""`compress generate`: a checkpoint and prompts in, their continuations out.

The sampling settings are checked first (`GenerateConfig`), then the checkpoint and its tokenizer load, every
prompt is tokenized, the cache of the longest is checked against the device's free memory, and
`compressor.generate` decodes each prompt on its own: one prefill pass over it, then one token per step, with
the sampler seeded afresh, so a prompt's continuation does not depend on the prompts given with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.budget import check_cache_fits
from compressor.checkpoint import load_model
from compressor.data import load_tokenizer, tokenizer_panics
from compressor.distributed import resolve_device
from compressor.errors import OptionError, check_applies
from compressor.generate import generate
from compressor.model import HybridLM


@dataclass(frozen=True)
class GenerateConfig:
    """The prompts and how to continue them: temperature 0 is greedy decoding; otherwise sampling, limited to
    the `top_k` most likely tokens and/or the smallest set holding `top_p` of the probability."""

    prompts: tuple[str, ...]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None  # default: the checkpoint's

    def __post_init__(self) -> None:
        if not self.prompts:
            raise OptionError("prompt", "is missing: give at least one --prompt")
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise OptionError("temperature", f"must be 0 (greedy) or a positive number, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise OptionError("top_k", f"must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise OptionError("seed", f"must be at least 0, got {self.seed}")
        sampling = ("--temperature above 0 (0 decodes greedily)", self.temperature > 0)
        check_applies(self, dict.fromkeys(("top_k", "top_p", "seed"), sampling))


@dataclass
class Generation:
    """The prompt, its continuation (decoded text) and how many tokens each took."""

    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def generate_text(
    model_dir: str | Path, config: GenerateConfig, on_text: Callable[[int, str], None] | None = None
) -> list[Generation]:
    """Load the checkpoint in `model_dir` with its tokenizer and continue each of `config.prompts`, in order
    (module docstring). `on_text(index, piece)` streams them: called with "" as prompt `index` starts, then
    with each new piece of its continuation as it is decoded (the pieces make up its `text`)."""
    device = resolve_device(config.device)
    model = load_model(model_dir, dtype=config.dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    with tokenizer_panics(model_dir):
        encoded = [tokenizer.encode(prompt, add_special_tokens=False).ids for prompt in config.prompts]
    for number, ids in enumerate(encoded, 1):
        if not ids:
            which = f"{number} of {len(encoded)} " if len(encoded) > 1 else ""
            raise OptionError("prompt", f"{which}is empty after tokenization")
    _check_cache_fits(model, max(map(len, encoded)) + config.max_new_tokens, device)
    generations = []
    for index, (prompt, ids) in enumerate(zip(config.prompts, encoded, strict=True)):
        stream = None
        if on_text is not None:
            on_text(index, "")
            stream = TextStream(tokenizer, lambda piece, index=index: on_text(index, piece))
        out = generate(
            model,
            torch.tensor([ids], device=device),
            config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            eos_token_id=model.config.eos_id,
            generator=torch.Generator(device=device).manual_seed(config.seed),
            on_token=None if stream is None else stream.add,
        )
        new = out[0, len(ids) :].tolist()
        text = tokenizer.decode(new)
        if stream is not None:
            stream.finish(text)
        generations.append(Generation(prompt, text, len(ids), len(new)))
    return generations


class TextStream:
    """The decoded text of a continuation as its tokens come, passed on piece by piece (`emit`). A piece is
    the text the newest tokens add to the few before them (decoded together, as a tokenizer that drops a
    leading space needs); it is held back while it ends inside a character (a byte-level token can), and
    `finish` passes on what the whole continuation's text holds beyond the pieces."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded last time, ids[read:] are new
        self.shown = ""

    def add(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._pass(now[len(before) :])
            self.prefix, self.read = self.read, len(self.ids)

    def finish(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self._pass(text[len(self.shown) :])

    def _pass(self, piece: str) -> None:
        self.shown += piece
        self.emit(piece)


def _check_cache_fits(model: HybridLM, tokens: int, device: torch.device) -> None:
    """Refuse a generation whose preallocated cache would not fit the device's free memory."""
    weight = {torch.float32: "fp32", torch.float16: "fp16"}.get(model.lm_head.weight.dtype, "bf16")
    check_cache_fits(model.config, tokens, device, parameter="max_new_tokens", weight_dtype=weight)
