"""Our engine or transformers on one checkpoint folder, and the folder's tokenizer: the project venv's side.

Runs in the project's own venv: `python torch_run.py request.json result.json`.
Request: {"task": "logprobs", "engine": "compressor" | "transformers", "model_dir", "prompts",
"max_new_tokens", "dtype", "trust_remote_code", "quantized_activations"} or {"task": "tokenize", "model_dir", "texts"}.
Greedy ids are computed by re-running the whole sequence per new token (no cache): slow, but the reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol import serve


def load(request: dict[str, Any]) -> tuple[str, Callable]:
    """(version, ids (1, n) -> logits (1, n, vocab)) for the requested engine."""
    import torch

    if request["engine"] == "compressor":
        from importlib.metadata import version

        from compressor.checkpoint import load_model
        from compressor.quantize import is_quantized_checkpoint, quantize_activations

        model = load_model(request["model_dir"], dtype=request["dtype"])
        # a quantized export as deployed (W8A8 / W4A4: activations quantized too), unless asked for its weights
        # alone (what an engine that dequantizes the weights computes)
        if is_quantized_checkpoint(request["model_dir"]) and request.get("quantized_activations", True):
            quantize_activations(model, request["model_dir"])
        return version("compressor"), model
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        request["model_dir"],
        dtype=getattr(torch, request["dtype"]),
        trust_remote_code=request["trust_remote_code"],
    ).eval()
    return transformers.__version__, lambda ids: model(input_ids=ids).logits


def logprobs(request: dict[str, Any]) -> dict[str, Any]:
    import torch

    start = time.perf_counter()
    version, forward = load(request)
    load_s = time.perf_counter() - start
    sequences = []
    with torch.inference_mode():
        for ids in request["prompts"]:
            tokens = torch.tensor([ids])
            scores = torch.log_softmax(forward(tokens)[0, :-1].double(), dim=-1)  # (n-1, vocab)
            greedy = []
            for _ in range(request["max_new_tokens"]):
                greedy.append(int(forward(tokens)[0, -1].argmax()))
                tokens = torch.cat([tokens, torch.tensor([[greedy[-1]]])], dim=1)
            sequences.append(
                {
                    "logprobs": scores.gather(1, tokens[0, 1 : len(ids)].unsqueeze(1)).squeeze(1).tolist(),
                    "top1": scores.argmax(-1).tolist(),
                    "greedy": greedy,
                }
            )
    return {"version": version, "load_s": load_s, "sequences": sequences}


def tokenize(request: dict[str, Any]) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(request["model_dir"]) / "tokenizer.json"))
    return {"ids": [encoding.ids for encoding in tokenizer.encode_batch(request["texts"])]}


def run(request: dict[str, Any]) -> dict[str, Any]:
    return (logprobs if request["task"] == "logprobs" else tokenize)(request)


if __name__ == "__main__":
    serve(run)
