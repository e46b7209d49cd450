"""vLLM (CPU build) on one checkpoint folder: prompt log-probabilities, greedy ids, or a speed probe.

Runs in the vllm venv (see benchmarks/engines.sh): `python vllm_run.py request.json result.json`.
Request: {"task": "logprobs" | "speed", "model_dir", "dtype", "max_model_len", "trust_remote_code", ...};
see benchmarks/engine_runners.py for each task's keys and the result's shape.
"""

from __future__ import annotations

import time
from typing import Any

from protocol import serve, speed_result


def load(request: dict[str, Any]):
    import vllm

    return vllm.LLM(
        model=request["model_dir"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        enforce_eager=True,
        trust_remote_code=request["trust_remote_code"],
        enable_prefix_caching=False,  # a speed repeat must compute its prompt again
        # On CPU the KV cache is otherwise a fraction (0.92) of ALL memory, refused when that much is not free.
        kv_cache_memory_bytes=int(request["kv_cache_gib"] * 2**30),
        seed=0,
    )


def logprobs(llm, request: dict[str, Any]) -> dict[str, Any]:
    """Per prompt: log p(ids[t+1] | ids[:t+1]) and the top-1 id at each of the first n-1 positions."""
    from vllm import SamplingParams

    max_new = request["max_new_tokens"]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max(max_new, 1),  # vLLM generates at least one token
        ignore_eos=True,  # greedy ids of a fixed length, as the other engines give them
        prompt_logprobs=request["top"],
        detokenize=False,
    )
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sequences = []
    for ids, output in zip(request["prompts"], outputs, strict=True):
        # prompt_logprobs[t] holds the distribution that predicted token t: None at t = 0.
        positions = output.prompt_logprobs[1:]
        sequences.append(
            {
                "logprobs": [pos[token].logprob for pos, token in zip(positions, ids[1:], strict=True)],
                "top1": [next(t for t, lp in pos.items() if lp.rank == 1) for pos in positions],
                "greedy": list(output.outputs[0].token_ids)[:max_new],
            }
        )
    return {"sequences": sequences}


def speed(llm, request: dict[str, Any]) -> dict[str, Any]:
    """Prefill tokens/s (a 1-token request) and decode tokens/s (the extra time of new_tokens more)."""
    from vllm import SamplingParams

    context, new_tokens = request["context"], request["new_tokens"]
    prompt = {"prompt_token_ids": request["prompt"]}

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    timed(1 + min(new_tokens, 4))  # warm-up
    prefill, decode = [], []
    for _ in range(request["repeats"]):
        t_prefill = timed(1)
        t_total = timed(1 + new_tokens)
        prefill.append(context / t_prefill)
        decode.append(new_tokens / max(t_total - t_prefill, 1e-9))
    return speed_result(prefill, decode)


def run(request: dict[str, Any]) -> dict[str, Any]:
    import vllm

    start = time.perf_counter()
    llm = load(request)
    load_s = time.perf_counter() - start
    result = (logprobs if request["task"] == "logprobs" else speed)(llm, request)
    return {"version": vllm.__version__, "load_s": load_s, **result}


if __name__ == "__main__":
    serve(run)
