"""lm-evaluation-harness on any compressor checkpoint (the optional `eval` extra: `pip install 'compressor[eval]'`).

`CompressorLM` is an lm-eval model over `HybridLM`, registered under the name "compressor" when this
module is imported. It runs every checkpoint compressor writes, per-block (`block_overrides`) ones
included, on CPU or GPU:

- `loglikelihood` (multiple-choice and loglikelihood tasks): requests sorted by length, right-padded into
  batches, one forward per batch; logits are formed only at the continuation's positions;
- `loglikelihood_rolling` (perplexity tasks): the text cut into lm-eval's rolling windows of `max_length`
  tokens (default: config.json's `max_position_embeddings`), every token scored once;
- `generate_until`: cached decoding (`compressor.generate`), greedy unless the task samples, stopped by
  the task's stop strings, EOS or `max_gen_toks`.

Text is tokenized with the checkpoint's `tokenizer.json` exactly as transformers' tokenizer does it (the
tokenizer's own template tokens, no extra BOS), so scores equal lm-eval's HF backend on checkpoints
transformers can load. Prompts of a generation batch must have the same length, because the engine has
no padding mask (left padding would run through the Mamba states): requests are grouped by prompt length.

From Python, `evaluate_tasks` runs tasks on several checkpoints and returns typed metrics. lm-eval's own
command line finds the model once this module is imported; running the module does that, then hands its
arguments (lm-eval's) over to lm-eval:

    python -m compressor.harness run --model compressor \\
        --model_args pretrained=examples/model,dtype=float32 --device cpu --tasks hellaswag --limit 100
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compressor.errors import CompressorError

INSTALL_HINT = "lm-eval is not installed: pip install 'compressor[eval]' (or pip install 'lm-eval>=0.4.10,<0.5')"
try:
    # lm-eval's own model names are registered lazily by importing lm_eval.models; do it before adding
    # ours, since lm-eval only does it itself while its registry is still empty.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:
    if __name__ == "__main__":  # python -m compressor.harness: a message, not a traceback
        sys.exit(f"error: {INSTALL_HINT}")
    raise CompressorError(INSTALL_HINT) from err

from compressor.checkpoint import load_model, parse_dtype  # noqa: E402
from compressor.data import load_tokenizer  # noqa: E402
from compressor.distributed import resolve_device  # noqa: E402
from compressor.generate import generate  # noqa: E402
from compressor.losses import CHUNK_LOGITS  # noqa: E402
from compressor.model import HybridLM  # noqa: E402
from compressor.quantize import is_quantized_checkpoint, quantize_activations  # noqa: E402

MODEL_NAME = "compressor"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
# lm-eval's spellings of the generation budget, in its order of priority.
MAX_GEN_TOKS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
GENERATION_KEYS = ("until", "do_sample", "temperature", "top_p", "top_k", *MAX_GEN_TOKS_KEYS)


@dataclass(frozen=True)
class GenerationOptions:
    """One generate_until request's options (lm-eval's `gen_kwargs`), hashable to group requests."""

    until: tuple[str, ...]
    max_gen_toks: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def from_lm_eval(cls, gen_kwargs: dict[str, Any], default_max_gen_toks: int) -> GenerationOptions:
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise CompressorError(
                f"generation option(s) {', '.join(unknown)} are not supported by the compressor lm-eval model; "
                f"it takes {', '.join(GENERATION_KEYS)}"
            )
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        budget = next((gen_kwargs[k] for k in MAX_GEN_TOKS_KEYS if gen_kwargs.get(k) is not None), None)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = gen_kwargs.get("do_sample")
        if sample is False or (sample is None and temperature <= 0):
            temperature = 0.0
        elif temperature <= 0:  # do_sample with no temperature: plain sampling
            temperature = 1.0
        return cls(
            until=tuple(s for s in until if s),
            max_gen_toks=int(budget if budget is not None else default_max_gen_toks),
            temperature=temperature,
            top_p=None if gen_kwargs.get("top_p") is None else float(gen_kwargs["top_p"]),
            top_k=None if gen_kwargs.get("top_k") is None else int(gen_kwargs["top_k"]),
        )


@register_model(MODEL_NAME)
class CompressorLM(TemplateLM):
    """An lm-eval model over a compressor checkpoint folder (or a loaded `HybridLM` plus its tokenizer).

    Arguments (also as lm-eval `--model_args k=v,...`): `pretrained` the checkpoint folder; `tokenizer`
    a folder or tokenizer.json (default: the checkpoint's); `device` (auto, cpu, cuda, cuda:N); `dtype`
    (default: the checkpoint's); `batch_size`; `max_length` (default: max_position_embeddings);
    `max_gen_toks`; `prefix_token_id`, the token an empty context and rolling windows start from (default:
    BOS, else EOS, as lm-eval's HF backend); `weights_only`: a quantized checkpoint runs dequantized
    without its activation quantization (by default it runs as deployed, as `compress eval` runs it).
    """

    def __init__(
        self,
        pretrained: str | Path | HybridLM,
        tokenizer: str | Path | None = None,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        prefix_token_id: int | None = None,
        weights_only: bool = False,
        max_batch_size: int | None = None,  # passed by lm-eval for automatic batch sizes, which this model lacks
    ) -> None:
        super().__init__()
        device = resolve_device(str(device))
        if isinstance(pretrained, HybridLM):
            if tokenizer is None:
                raise CompressorError("a loaded model needs its tokenizer: pass tokenizer=FOLDER")
            self.model = pretrained.to(device=device, dtype=parse_dtype(dtype)).eval()
            self.name = type(pretrained).__name__
        else:
            self.model = load_model(pretrained, dtype=dtype, device=device)
            self.name = str(pretrained)
            if not weights_only and is_quantized_checkpoint(pretrained):  # as deployed, as compress eval runs it
                quantize_activations(self.model, pretrained)
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else pretrained)
        self._device = device
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_length = _positive_int("max_length", max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        config = self.model.config
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if config.eos_id is None or not 0 <= config.eos_id < vocab:
            raise CompressorError(
                f"{self.name}: config.json names no EOS token the tokenizer has (eos_token_id "
                f"{config.eos_token_id}); set eos_token_id in config.json"
            )
        bos = config.bos_token_id if isinstance(config.bos_token_id, int) and 0 <= config.bos_token_id < vocab else None
        self._prefix_token_id = prefix_token_id if prefix_token_id is not None else bos

    # ----- what TemplateLM asks ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.model.config.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id if self._prefix_token_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`; the tokenizer's template tokens unless told otherwise (as the HF backend)."""
        if add_special_tokens is None:  # a string that already starts with the prefix token gets no second one
            prefix = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
            add_special_tokens = not (prefix and string.startswith(prefix))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(cache key, context ids, continuation ids) -> (log-probability of the continuation, is it greedy)."""
        # longest first: each batch is padded to its first request, and running out of memory shows at once
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            scores = self._score([(requests[i][1], requests[i][2]) for i in chunk])
            for i, score in zip(chunk, scores, strict=True):
                results[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text: rolling windows of `max_length` tokens, every token scored once."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            pieces = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context until one of its stop strings, EOS or its `max_gen_toks`."""
        groups: dict[tuple[GenerationOptions, int], list[int]] = {}
        prompts = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            options = GenerationOptions.from_lm_eval(gen_kwargs, self.max_gen_toks)
            room = self.max_length - options.max_gen_toks  # the prompt keeps its last tokens
            if room <= 0:
                raise CompressorError(
                    f"max_gen_toks {options.max_gen_toks} leaves no room for a prompt in max_length {self.max_length}"
                )
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            prompts.append(ids)
            groups.setdefault((options, len(ids)), []).append(index)
        results = [""] * len(requests)
        for (options, _), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                texts = self._generate(torch.tensor([prompts[i] for i in chunk]), options)
                for i, text in zip(chunk, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    # ----- the model ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward over right-padded (context + continuation) rows; logits only where continuations are."""
        inputs, rows, columns, targets = [], [], [], []
        for row, (context, continuation) in enumerate(pairs):
            if not continuation or len(continuation) > self.max_length:
                raise CompressorError(
                    f"a continuation of {len(continuation)} tokens cannot be scored within max_length {self.max_length}"
                )
            tokens = (context + continuation)[-(self.max_length + 1) :][:-1]  # left-truncated, as lm-eval does
            inputs.append(tokens)
            rows += [row] * len(continuation)
            columns += range(len(tokens) - len(continuation), len(tokens))
            targets += continuation
        width = max(len(tokens) for tokens in inputs)
        ids = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        device = self._device
        rows_t, columns_t = torch.tensor(rows, device=device), torch.tensor(columns, device=device)
        targets_t = torch.tensor(targets, device=device)

        def head(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            selected = hidden[rows_t, columns_t]  # (continuation tokens, hidden)
            step = max(1, CHUNK_LOGITS // weight.shape[0])  # rolling windows score every token: chunk the logits
            logprobs, misses = [], []
            for start in range(0, selected.shape[0], step):
                logits = F.linear(selected[start : start + step], weight).float()  # (step, vocab)
                target = targets_t[start : start + step]
                logprobs.append(logits.log_softmax(dim=-1).gather(1, target[:, None])[:, 0])
                misses.append(logits.argmax(dim=-1) != target)
            return torch.cat(logprobs), torch.cat(misses)

        logprobs, misses = self.model(ids.to(device), head=head)
        totals = torch.zeros(len(pairs), dtype=torch.float64, device=device).index_add_(0, rows_t, logprobs.double())
        missed = torch.zeros(len(pairs), dtype=torch.long, device=device).index_add_(0, rows_t, misses.long())
        return [(float(t), not bool(m)) for t, m in zip(totals.tolist(), missed.tolist(), strict=True)]

    def _generate(self, prompts: torch.Tensor, options: GenerationOptions) -> list[str]:
        """Continue equal-length prompts (batch, prompt_len); texts cut before their first stop string."""
        eos = self.eot_token_id

        def stopped(new: torch.Tensor) -> torch.Tensor:  # (batch, steps) -> (batch,)
            texts = self.tokenizer.decode_batch(new.tolist(), skip_special_tokens=False)
            return torch.tensor([any(s in text for s in options.until) for text in texts])

        out = generate(
            self.model,
            prompts.to(self._device),
            options.max_gen_toks,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            eos_token_id=eos,
            stop=stopped if options.until else None,
        )
        texts = []
        for new in out[:, prompts.shape[1] :].tolist():
            new = new[: new.index(eos)] if eos in new else new
            text = self.tok_decode(new)
            for stop in options.until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results."""
        config = self.model.config
        return {
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.lm_head.weight.dtype).removeprefix("torch."),
            "model_pattern": config.pattern,
            "model_uniform": config.is_uniform,
        }


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise CompressorError(
            f"{name} must be a positive integer, got {value!r} (the compressor lm-eval model has no 'auto' sizes)"
        ) from None
    if number <= 0:
        raise CompressorError(f"{name} must be a positive integer, got {value!r}")
    return number


# ----- several checkpoints, several tasks ---------------------------------------------------------------
@dataclass
class TaskMetric:
    """One lm-eval metric of a task: `name` (acc, acc_norm, exact_match, word_perplexity, ...) under a
    `filter` (lm-eval's answer extraction, "none" for most tasks), with its standard error when lm-eval
    computed one."""

    name: str
    value: float
    stderr: float | None = None
    filter: str = "none"


@dataclass
class TaskResult:
    """One task (or group) on one model."""

    task: str
    metrics: list[TaskMetric]
    samples: int | None = None  # documents evaluated (after --limit)
    num_fewshot: int | None = None

    def metric(self, name: str, filter: str = "none") -> TaskMetric:
        for metric in self.metrics:
            if metric.name == name and metric.filter == filter:
                return metric
        known = ", ".join(f"{m.name} ({m.filter})" for m in self.metrics)
        raise CompressorError(f"task {self.task} has no metric {name} under filter {filter}; it has {known}")


@dataclass
class ModelTaskResults:
    """Every task's metrics on one model."""

    model: str
    tasks: list[TaskResult]

    def task(self, name: str) -> TaskResult:
        for result in self.tasks:
            if result.task == name:
                return result
        raise CompressorError(f"no results for task {name} on {self.model}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelTaskResults:
        tasks = [TaskResult(**{**t, "metrics": [TaskMetric(**m) for m in t["metrics"]]}) for t in raw["tasks"]]
        return cls(model=raw["model"], tasks=tasks)


def evaluate_tasks(
    model_paths: Sequence[str | Path],
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str | None = None,
    weights_only: bool = False,
    bootstrap_iters: int = 100_000,
) -> list[ModelTaskResults]:
    """Run lm-eval `tasks` on each checkpoint, one after the other (one model in memory at a time).

    `tasks` are lm-eval task or group names, names defined by YAML files under `include_path`, or YAML file
    paths. `limit` caps the documents per task (a float below 1: a fraction). lm-eval's seeds are fixed, so
    the few-shot examples are the same for every model. Quantized checkpoints run as deployed (activation
    quantization included) unless `weights_only`. `bootstrap_iters` sets lm-eval's bootstrap for the
    standard errors of metrics without a closed form (0 skips them).
    """
    if not tasks:
        raise CompressorError("no lm-eval tasks given: name at least one (e.g. hellaswag, or a task YAML)")
    if include_path is not None and not Path(include_path).is_dir():
        raise CompressorError(f"--include-path {include_path} is not a folder of lm-eval task YAML files")
    names, folders = _task_names(tasks, include_path)
    task_manager = _task_manager(names, folders)
    import lm_eval

    results = []
    for path in model_paths:
        model = CompressorLM(path, device=device, dtype=dtype, batch_size=batch_size, weights_only=weights_only)
        raw = lm_eval.simple_evaluate(
            model=model,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
        results.append(ModelTaskResults(model=str(path), tasks=_task_results(raw)))
        del model
    return results


def _task_names(tasks: Sequence[str], include_path: str | Path | None) -> tuple[list[str], list[str]]:
    """Task names and the folders to index: a task YAML file becomes its name and its folder (lm-eval
    before 0.4.11 loads tasks by name only)."""
    import yaml

    class Loader(yaml.SafeLoader):  # reads task YAMLs without running their !function tags
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    names, folders = [], [str(include_path)] if include_path is not None else []
    for task in tasks:
        path = Path(task)
        if not path.is_file():
            names.append(task)
            continue
        try:
            raw = yaml.load(path.read_text(), Loader=Loader)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise CompressorError(f"{path} is not a readable lm-eval task YAML ({err})") from None
        name = next((raw[k] for k in ("task", "group") if isinstance(raw, dict) and isinstance(raw.get(k), str)), None)
        if name is None:
            raise CompressorError(f"{path} is not an lm-eval task YAML: it has no 'task: NAME'")
        names.append(name)
        folders.append(str(path.parent))
    return names, list(dict.fromkeys(folders))


def _task_manager(names: list[str], folders: list[str]):
    """lm-eval's task index; its thousands of built-in tasks are indexed (seconds) only when asked for."""
    from lm_eval.tasks import TaskManager

    if folders:
        local = TaskManager(include_path=folders, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=folders or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise CompressorError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: give names lm-eval lists (lm-eval ls tasks), "
            "task YAML files, or a folder of task YAML files with --include-path"
        )
    return manager


def _task_results(raw: dict[str, Any]) -> list[TaskResult]:
    """lm-eval's results ({"results": {task: {"acc,none": v, "acc_stderr,none": s, ...}}, ...}) as records."""
    out = []
    for task, values in raw["results"].items():
        metrics = []
        for key, value in values.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{name}_stderr,{filter_name}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            metrics.append(TaskMetric(name=name, value=float(value), stderr=stderr, filter=filter_name))
        samples = raw.get("n-samples", {}).get(task, {}).get("effective")
        out.append(TaskResult(task=task, metrics=metrics, samples=samples, num_fewshot=raw.get("n-shot", {}).get(task)))
    return out


if __name__ == "__main__":  # lm-eval's own command line, with the "compressor" model registered above
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
