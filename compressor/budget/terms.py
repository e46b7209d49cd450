"""Budgets: what a compressed architecture must meet, as a set of terms.

A term is one limit a budget can set: inference memory, parameters, active parameters, a speedup. Each is one
`Term` subclass registered in `TERMS`, which gives everything around it:

- its option (`option`, the keyword of `Budget.from_options`; the command line's `--target-...` flag is
  generated from it) and its parser (`parse`: the written form, '19.66GiB', '9B', ...);
- its measure of an architecture (`measure`), its side (`floor`: a floor such as a speedup, else a cap) and
  its words (`describe`, `missed`), which `Budget.violations` and `Budget.describe` loop over;
- for a term that is additive over blocks (`additive`), its per-block share (`share`: the fixed part plus
  the blocks' shares make the whole), which the strategies' per-block costs (`strategies.costs`) and the
  exact solver's rows (`strategies.solver`) loop over.

A budget holds its limits by term name (`Budget(memory=..., params=...)`, `budget.memory`, records keep them
under the same names) with the setting they share: context, batch, deployment `Precision`, prefill chunk,
GPU and workload. A new term is one subclass here, decorated with `@register`, and its test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from compressor.budget.counts import active_parameters, num_parameters
from compressor.budget.memory import DEFAULT_PREFILL_CHUNK, MemoryEstimate, estimate_memory, kv_bytes_per_token
from compressor.budget.roofline import GPUSpec, Workload, gpu_from_options, speedup
from compressor.budget.units import Precision, format_bytes, parse_context, parse_count, parse_params, parse_size
from compressor.config import HybridConfig
from compressor.errors import BudgetError, OptionError


class Term:
    """One limit a budget can set (module docstring). Subclasses set the class attributes and `parse`,
    `measure`, `describe`; an additive term also `share`."""

    name: ClassVar[str]  # Budget keyword and record key: "memory"
    option: ClassVar[str]  # Budget.from_options keyword, the flag's name: "target_mem" (--target-mem)
    help: ClassVar[str]  # the flag's help
    value_type: ClassVar[type] = str  # what the flag takes (the written form, or a number)
    example: ClassVar[str | float]  # a value the flag takes, as its help shows it
    what: ClassVar[str]  # the measure in words, for `missed`: "parameters"
    floor: ClassVar[bool] = False  # a floor (value >= limit) rather than a cap (value <= limit)
    additive: ClassVar[bool] = False  # `share` sums over the blocks (plus a fixed part)
    # `measure` adds the widest block's prefill activation allowance to the shares' sum (memory)
    allowance: ClassVar[bool] = False

    def parse(self, written) -> int | float:
        """The limit from the flag's value."""
        raise NotImplementedError

    def measure(self, budget: Budget, config: HybridConfig, reference: HybridConfig | None = None) -> int | float:
        """What `config` takes of this term under `budget`'s setting (`reference`: the original model)."""
        raise NotImplementedError

    def share(self, budget: Budget, config: HybridConfig) -> int:
        """The additive part of `measure` (an additive term's whole measure but for a per-block maximum, such
        as memory's activation allowance); summed over blocks plus the fixed part."""
        return int(self.measure(budget, config))

    def check(self, budget: Budget) -> None:
        """Refuse a budget this term cannot be measured in (BudgetError)."""

    def met(self, value: float, limit: float) -> bool:
        return value >= limit if self.floor else value <= limit

    def describe(self, budget: Budget, limit: float) -> str:
        """The limit in words, for `Budget.describe`."""
        raise NotImplementedError

    def format(self, value: float) -> str:
        return f"{value:,}"

    def missed(self, value: float, limit: float) -> str:
        """A missed limit in words, for `Budget.violations`."""
        side = "<" if self.floor else ">"
        return f"{self.what} {self.format(value)} {side} {self.format(limit)}"


# What every term of a budget is measured at; `Budget.from_dict` reads these and the terms' names.
_SETTINGS = ("context", "batch", "weight_dtype", "kv_dtype", "ssm_dtype", "prefill_chunk", "gpu", "workload")
TERMS: dict[str, Term] = {}


def register(cls: type[Term]) -> type[Term]:
    """Add a term to `TERMS` (by its name; the order of registration is the order of flags and words)."""
    if cls.name in TERMS or cls.name in _SETTINGS:
        raise TypeError(f"a budget term or setting is already named {cls.name!r}")
    TERMS[cls.name] = cls()
    return cls


@register
class Memory(Term):
    """Inference memory (weights, caches, activation allowance) at the budget's context and batch."""

    name, option, what = "memory", "target_mem", "memory"
    help, example = "Memory budget at --ctx, e.g. 22GiB or 19.66GiB.", "19.66GiB"
    additive = allowance = True

    def parse(self, written) -> int:
        return parse_size(written)

    def measure(self, budget, config, reference=None) -> int:
        return budget.memory_of(config).total

    def share(self, budget, config) -> int:
        memory = estimate_memory(config, budget.context, budget.batch, precision=budget.precision, prefill_chunk=0)
        return memory.weights + memory.cache  # the activation allowance is the widest block's, not a sum

    def describe(self, budget, limit) -> str:
        return f"{format_bytes(limit)} at {budget.context:,} tokens x {budget.batch} ({budget.precision.weight})"

    def format(self, value) -> str:
        return format_bytes(value)


@register
class Params(Term):
    name, option, what = "params", "target_params", "parameters"
    help, example = "Parameter budget, e.g. 9B.", "9B"
    additive = True

    def parse(self, written) -> int:
        return parse_params(written)

    def measure(self, budget, config, reference=None) -> int:
        return num_parameters(config)

    def describe(self, budget, limit) -> str:
        return f"<= {limit:,} parameters"


@register
class ActiveParams(Term):
    """Parameters a token uses (`active_parameters`; less than all of them in MoE models)."""

    name, option, what = "active_params", "target_active_params", "active parameters"
    help, example = "Active-parameter budget (what a token uses in MoE models), e.g. 3B.", "3B"
    additive = True

    def parse(self, written) -> int:
        return parse_count(written, "active parameter count")

    def measure(self, budget, config, reference=None) -> int:
        return active_parameters(config)

    def describe(self, budget, limit) -> str:
        return f"<= {limit:,} active parameters"


@register
class KVCache(Term):
    """KV cache bytes at the budget's context and batch in its KV dtype: the attention blocks' (the Mamba
    blocks' states do not grow with the context; --target-mem counts them)."""

    name, option, what = "kv_cache", "target_kv", "KV cache"
    help, example = "KV cache budget at --ctx and --batch (attention blocks only), e.g. 2GiB.", "2GiB"
    additive = True

    def parse(self, written) -> int:
        return parse_size(written)

    def measure(self, budget, config, reference=None) -> int:
        kv_dtype = budget.precision.kv or budget.precision.compute
        return kv_bytes_per_token(config, kv_dtype) * budget.context * budget.batch

    def describe(self, budget, limit) -> str:
        return f"KV cache <= {format_bytes(limit)} at {budget.context:,} tokens x {budget.batch}"

    def format(self, value) -> str:
        return format_bytes(value)


@register
class MinSpeedup(Term):
    """Tokens/s of the candidate over tokens/s of the original model, on the budget's workload and GPU."""

    name, option, what = "min_speedup", "min_speedup", "speedup"
    help, example = "At least this many times the original tokens/s, e.g. 1.5.", 1.5
    value_type = float
    floor = True

    def parse(self, written) -> float:
        if not (math.isfinite(written) and written > 0):
            raise OptionError("min_speedup", f"must be a positive number, got {written}")
        return written

    def check(self, budget) -> None:
        if budget.gpu is None:
            raise BudgetError("a throughput budget (--min-speedup) needs a GPU (--gpu)")

    def measure(self, budget, config, reference=None) -> float:
        return budget.speedup_of(config, reference)

    def describe(self, budget, limit) -> str:
        workload = budget.throughput_workload()
        return (
            f">= {limit:.2f}x tokens/s on {budget.gpu.name} "
            f"({workload.input_tokens:,} in / {workload.output_tokens:,} out)"
        )

    def format(self, value) -> str:
        return f"{value:.2f}x"


@dataclass(frozen=True, init=False)
class Budget:
    """What a compressed architecture must meet: a limit for each term set (`TERMS`: memory at the context and
    batch, parameters, active parameters, a speedup on a workload and GPU, ...), with the setting the terms
    are measured at. Unset terms are off; a budget sets at least one. `budget.<term name>` is its limit
    (None when unset): `Budget(memory=parse_size("20GiB"), context=131072).memory`."""

    context: int = 8192
    batch: int = 1
    precision: Precision = Precision()
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    gpu: GPUSpec | None = None
    workload: Workload | None = None  # default: `context` split as in `compress estimate`
    limits: tuple[tuple[str, int | float], ...] = ()  # (term name, limit) of the terms set, in `TERMS` order

    def __init__(
        self,
        *,
        context: int = 8192,
        batch: int = 1,
        precision: Precision | None = None,
        weight_dtype: str | None = None,
        kv_dtype: str | None = None,
        ssm_dtype: str | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        gpu: GPUSpec | None = None,
        workload: Workload | None = None,
        limits: tuple[tuple[str, int | float], ...] = (),
        **terms: int | float | None,
    ) -> None:
        """`terms`: a limit by term name (None: unset); `limits` as the field (what `dataclasses.replace`
        passes back), updated by `terms`. The dtypes replace those of `precision`."""
        unknown = sorted(set(terms) - set(TERMS))
        if unknown:
            raise TypeError(f"Budget got an unknown term {unknown[0]!r}: the terms are {', '.join(TERMS)}")
        base = precision or Precision()
        precision = Precision(weight_dtype or base.weight, kv_dtype or base.kv, ssm_dtype or base.ssm)
        merged = {**dict(limits), **terms}
        chosen = tuple((name, merged[name]) for name in TERMS if merged.get(name) is not None)
        for name, value in dict(
            context=context, batch=batch, precision=precision, prefill_chunk=prefill_chunk, gpu=gpu,
            workload=workload, limits=chosen,
        ).items():  # fmt: skip
            object.__setattr__(self, name, value)
        for name, _ in chosen:
            TERMS[name].check(self)
        if not chosen:
            flags = ", ".join("--" + term.option.replace("_", "-") for term in TERMS.values())
            raise BudgetError(f"no budget given: set a memory, parameter, active-parameter or speedup target ({flags})")

    def __getattr__(self, name: str):
        if name in TERMS:  # only reached for names that are not fields: the terms' limits
            return self.limit(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def limit(self, name: str) -> int | float | None:
        """The limit of the term `name` (None when the budget leaves it unset)."""
        return dict(self.limits).get(name)

    def terms(self) -> list[tuple[Term, int | float]]:
        """Each term set, with its limit, in `TERMS` order."""
        return [(TERMS[name], limit) for name, limit in self.limits]

    def additive_terms(self) -> list[tuple[Term, int | float]]:
        """The terms set that a per-block solver can pack against (`Term.additive`)."""
        return [(term, limit) for term, limit in self.terms() if term.additive]

    @property
    def weight_dtype(self) -> str:
        return self.precision.weight

    @property
    def kv_dtype(self) -> str | None:
        return self.precision.kv

    @property
    def ssm_dtype(self) -> str | None:
        return self.precision.ssm

    def memory_of(self, config: HybridConfig) -> MemoryEstimate:
        return estimate_memory(
            config, self.context, self.batch, precision=self.precision, prefill_chunk=self.prefill_chunk
        )

    @classmethod
    def from_options(
        cls,
        *,
        ctx: str = "8k",
        batch: int = 1,
        gpu: str | None = None,
        gpu_bandwidth: str | None = None,
        gpu_tflops: float | None = None,
        isl: str | None = None,
        osl: str | None = None,
        weight_dtype: str = "bf16",
        kv_dtype: str | None = None,
        ssm_dtype: str | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        **targets,
    ) -> Budget | None:
        """A budget from its written form ('19.66GiB', '128k', '9B', 'a10g', '8k' ...); None when no limit is
        given. Keyword names are those of the command-line options; `targets` by each term's `option`
        (target_mem, target_params, target_active_params, min_speedup, ...)."""
        options = {term.option: name for name, term in TERMS.items()}
        unknown = sorted(set(targets) - set(options))
        if unknown:
            raise TypeError(f"Budget.from_options got an unknown option {unknown[0]!r}")
        if all(value is None for value in targets.values()):
            return None
        if batch < 1:
            raise OptionError("batch", f"must be at least 1, got {batch}")
        if prefill_chunk < 0:
            raise OptionError("prefill_chunk", f"must be >= 0 (0 leaves out the activations), got {prefill_chunk}")
        limits = {options[option]: TERMS[options[option]].parse(v) for option, v in targets.items() if v is not None}
        context = parse_context(ctx)
        workload = None
        if isl is not None or osl is not None:
            workload = Workload.for_context(
                context,
                batch,
                input_tokens=parse_context(isl) if isl is not None else None,
                output_tokens=parse_context(osl) if osl is not None else None,
            )
        return cls(
            context=context,
            batch=batch,
            precision=Precision.from_options(weight_dtype, kv_dtype, ssm_dtype),
            prefill_chunk=prefill_chunk,
            gpu=gpu_from_options(gpu, gpu_bandwidth, gpu_tflops, limits.get("memory")),
            workload=workload,
            **limits,
        )

    def to_dict(self) -> dict:
        """A JSON form (records keep the budget they were made for): every term's limit by name (None when
        unset) and the setting; `from_dict` reads it back, and the records written before terms were values."""
        return {
            **{name: self.limit(name) for name in TERMS},
            "context": self.context,
            "batch": self.batch,
            **self.precision.keywords(),
            "prefill_chunk": self.prefill_chunk,
            "gpu": asdict(self.gpu) if self.gpu is not None else None,
            "workload": asdict(self.workload) if self.workload is not None else None,
            "description": self.describe(),
        }

    @classmethod
    def from_dict(cls, raw: dict) -> Budget:
        raw = {k: v for k, v in raw.items() if k != "description"}
        unknown = sorted(set(raw) - set(TERMS) - set(_SETTINGS))
        if unknown:
            raise BudgetError(f"a budget record has an unknown key {unknown[0]!r}")
        for name in TERMS:  # the settings' types are checked with the record (outputs.check_record)
            value = raw.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                raise BudgetError(f"a budget record's {name} must be a positive number, got {value!r}")
        if raw.get("gpu") is not None:
            raw["gpu"] = GPUSpec(**raw["gpu"])
        if raw.get("workload") is not None:
            raw["workload"] = Workload(**raw["workload"])
        return cls(**raw)

    def throughput_workload(self) -> Workload:
        return self.workload if self.workload is not None else Workload.for_context(self.context, self.batch)

    def speedup_of(self, config: HybridConfig, reference: HybridConfig) -> float | None:
        if self.gpu is None:
            return None
        return speedup(config, reference, self.throughput_workload(), self.gpu, precision=self.precision)

    def violations(self, config: HybridConfig, reference: HybridConfig) -> list[str]:
        """What `config` misses, in words (empty when it meets the budget)."""
        missed = []
        for term, limit in self.terms():
            value = term.measure(self, config, reference)
            if not term.met(value, limit):
                missed.append(term.missed(value, limit))
        return missed

    def describe(self) -> str:
        return "; ".join(term.describe(self, limit) for term, limit in self.terms())
