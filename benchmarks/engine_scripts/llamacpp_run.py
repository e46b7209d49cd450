"""llama.cpp (llama-cpp-python) on one GGUF file: next-token log-probabilities, greedy ids, or a speed probe.

Runs in the llama venv: `python llamacpp_run.py request.json result.json`.
Request: {"task": "logprobs" | "speed", "gguf", "n_threads", "kv_type", ...}; see
benchmarks/engine_runners.py for each task's keys and the result's shape.

A FRESH context (a new `Llama`) per sequence: a hybrid's recurrent (Mamba) state lives in the context, and
`Llama.reset()` only rewinds the token count in some releases, so reusing one would start each sequence
from the previous one's state.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from protocol import serve, speed_result

KV_TYPES = {"f16": 1, "f32": 0}  # GGML_TYPE_F16, GGML_TYPE_F32; llama.cpp's default KV cache is f16


def new_context(request: dict[str, Any], n_ctx: int, logits_all: bool):
    from llama_cpp import Llama

    kv_type = KV_TYPES[request["kv_type"]]
    return Llama(
        model_path=request["gguf"],
        n_ctx=n_ctx,
        n_batch=n_ctx,  # the whole prompt in one decode call
        n_threads=request["n_threads"],
        n_threads_batch=request["n_threads"],
        logits_all=logits_all,
        type_k=kv_type,
        type_v=kv_type,
        seed=0,
        verbose=False,
    )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logprobs(request: dict[str, Any]) -> dict[str, Any]:
    """Per prompt: log p(ids[t+1] | ids[:t+1]) and the top-1 id at each of the first n-1 positions."""
    max_new = request["max_new_tokens"]
    sequences = []
    for ids in request["prompts"]:
        llm = new_context(request, n_ctx=len(ids) + max_new + 1, logits_all=True)
        llm.eval(ids)
        scores = log_softmax(np.array(llm.scores[: len(ids) - 1]))  # (n-1, vocab)
        greedy = []
        for _ in range(max_new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(token)
            llm.eval([token])
        llm.close()
        sequences.append(
            {
                "logprobs": scores[np.arange(len(ids) - 1), ids[1:]].tolist(),
                "top1": scores.argmax(axis=-1).tolist(),
                "greedy": greedy,
            }
        )
    return {"sequences": sequences}


def speed(request: dict[str, Any]) -> dict[str, Any]:
    """Prefill tokens/s (the prompt in one call) and decode tokens/s (one token per call after it)."""
    prompt, new_tokens = request["prompt"], request["new_tokens"]
    prefill, decode = [], []
    for repeat in range(request["repeats"] + 1):  # the first run is a warm-up
        llm = new_context(request, n_ctx=len(prompt) + new_tokens + 1, logits_all=False)
        start = time.perf_counter()
        llm.eval(prompt)
        t_prefill = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(new_tokens):  # which ids are decoded does not change the work
            llm.eval([prompt[i % len(prompt)]])
        t_decode = time.perf_counter() - start
        llm.close()
        if repeat:
            prefill.append(len(prompt) / t_prefill)
            decode.append(new_tokens / t_decode)
    return speed_result(prefill, decode)


def run(request: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    result = (logprobs if request["task"] == "logprobs" else speed)(request)
    return {"version": llama_cpp.__version__, **result}


if __name__ == "__main__":
    serve(run)
