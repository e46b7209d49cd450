"""The file protocol every engine script speaks: `python SCRIPT request.json result.json`.

The request is a JSON object; the result is the JSON object the script's `run(request)` returns, or
`{"error": "<one line>"}` when it raises: an engine refusing a model is a result to record, so the caller
never sees a traceback (it goes to stderr, which the driver keeps only for a crash before this point).
Standard library only: each engine venv imports this beside its own packages.
"""

from __future__ import annotations

import json
import statistics
import sys
import traceback
from collections.abc import Callable
from typing import Any


def one_line(error: BaseException) -> str:
    """`Type: message` on one line, with the innermost cause appended (what a chained error hides)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    if root is not error:
        text += " [cause: " + " ".join(f"{type(root).__name__}: {root}".split()) + "]"
    return text[:2000]


def speed_result(prefill: list[float], decode: list[float]) -> dict[str, Any]:
    """A speed task's result: the medians of the prefill and decode tokens/s of each run, and the runs."""
    return {
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "prefill_runs": prefill,
        "decode_runs": decode,
    }


def serve(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Read the request named by argv[1], write run(request) (or the error) to argv[2] as JSON."""
    request_path, result_path = sys.argv[1], sys.argv[2]
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    try:
        result = run(request)
    except BaseException as error:  # noqa: BLE001 - a refusal of any kind is data for the caller
        traceback.print_exc()
        result = {"error": one_line(error)}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
