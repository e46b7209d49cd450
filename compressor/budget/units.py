"""Units and dtypes: the written forms of sizes, context lengths, counts and bandwidths, and the dtypes a
deployment stores weights, the KV cache and the SSM state in.

Units. Memory is counted in bytes. GiB = 2**30 and GB = 10**9 bytes; a bare `G` (`M`, `K`, `T`) means GiB
(MiB, ...), as nvidia-smi and torch report memory in binary units. Context lengths take `k` = 1024 and
`M` = 1024**2 tokens (`128k` = 131,072). Parameter counts take `K`, `M`, `B`, `T` = 10**3, 10**6, 10**9,
10**12 (`9.5B`). Bandwidths (`600GB/s`) and FLOP/s are decimal, as vendors quote them. A datasheet's
"80 GB" of GPU memory is taken as 80 GiB (what nvidia-smi shows, less what the driver reserves).

Compute dtype. Activations and the Mamba conv state are in the compute dtype: fp32 for fp32 weights, fp16
for fp16, bf16 otherwise (fp8 / fp4 weights are dequantized into bf16). The KV cache defaults to the
compute dtype and may be fp8 (1 byte, per-tensor scales not counted); the SSM state defaults to the
config's `mamba_ssm_cache_dtype` (fp32 in every published model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from compressor.errors import BudgetError

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40

_SIZE_UNITS = {
    "b": 1,
    "k": KIB, "kib": KIB, "m": MIB, "mib": MIB, "g": GIB, "gib": GIB, "t": TIB, "tib": TIB,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip
_CONTEXT_UNITS = {"": 1, "k": 1024, "m": 1024**2}
_PARAM_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_QUANTITY = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>.*)")
_SIZE_HELP = "22GiB, 19.66GiB, 512MiB or 20GB (GB = 10^9 bytes; G alone = GiB)"
_CONTEXT_HELP = "4096, 8k or 128k (k = 1024 tokens, M = 1024^2)"
_PARAMS_HELP = "800M, 9B or 9.5B (M = 10^6, B = 10^9)"
_BANDWIDTH_HELP = "600GB/s or 3.35TB/s"


def format_bytes(nbytes: float) -> str:
    """A size for people: GiB from 1 GiB up, MiB below (binary units, two decimals)."""
    if abs(nbytes) >= GIB:
        return f"{nbytes / GIB:,.2f} GiB"
    return f"{nbytes / MIB:,.2f} MiB"


def _quantity(text: str, what: str, examples: str) -> tuple[Fraction, str]:
    """Split '19.66GiB' into (Fraction('19.66'), 'gib'); one-line errors for anything else."""
    stripped = str(text).strip().replace("_", "")
    if not stripped:
        raise BudgetError(f"empty {what}: write it like {examples}")
    if stripped.startswith("-"):
        raise BudgetError(f"{what} {text!r} is negative: write a positive amount like {examples}")
    match = _QUANTITY.fullmatch(stripped)
    if match is None:
        raise BudgetError(f"{what} {text!r} does not start with a number: write it like {examples}")
    return Fraction(match["number"]), match["unit"].strip()


def _positive_int(value: Fraction, text: str, what: str, examples: str, *, exact: bool) -> int:
    if exact and value.denominator != 1:
        raise BudgetError(f"{what} {text!r} is not a whole number: write it like {examples}")
    number = round(value)
    if number <= 0:
        raise BudgetError(f"{what} {text!r} must be more than zero: write it like {examples}")
    return number


def parse_size(text: str) -> int:
    """A memory size in bytes: '22GiB', '19.66GiB', '512MiB', '20GB' (10^9), '22G' (= GiB)."""
    value, unit = _quantity(text, "memory size", _SIZE_HELP)
    if not unit:
        raise BudgetError(f"memory size {text!r} has no unit: write it like {_SIZE_HELP}")
    if unit.lower() not in _SIZE_UNITS:
        hint = " (that is a bandwidth, not a size)" if unit.endswith("/s") else ""
        raise BudgetError(f"unknown unit {unit!r} in memory size {text!r}{hint}: write it like {_SIZE_HELP}")
    return _positive_int(value * _SIZE_UNITS[unit.lower()], text, "memory size", _SIZE_HELP, exact=False)


def parse_context(text: str) -> int:
    """A number of tokens: '4096', '8k' (8192), '128k' (131072), '1M' (1048576)."""
    value, unit = _quantity(text, "context length", _CONTEXT_HELP)
    if unit.lower() not in _CONTEXT_UNITS:
        raise BudgetError(f"unknown suffix {unit!r} in context length {text!r}: write it like {_CONTEXT_HELP}")
    return _positive_int(value * _CONTEXT_UNITS[unit.lower()], text, "context length", _CONTEXT_HELP, exact=True)


def parse_params(text: str) -> int:
    """A parameter count: '800M', '9B', '9.5B', '12310001152' (commas allowed)."""
    return parse_count(text, "parameter count")


def parse_tokens(text: str) -> int:
    """A token budget, with the parameter-count suffixes: '50M', '2B', '2.5B', '1000000'."""
    return parse_count(text, "token count")


def parse_count(text: str, what: str) -> int:
    """A count with decimal suffixes K/M/B/T (10**3 .. 10**12); `what` names it in errors."""
    examples = _PARAMS_HELP
    value, unit = _quantity(str(text).replace(",", ""), what, examples)
    if unit.lower() not in _PARAM_UNITS:
        raise BudgetError(f"unknown suffix {unit!r} in {what} {text!r}: write it like {examples}")
    return _positive_int(value * _PARAM_UNITS[unit.lower()], text, what, examples, exact=False)


def parse_bandwidth(text: str) -> float:
    """A memory bandwidth in bytes/s: '600GB/s', '3.35TB/s', '1.5TiB/s'."""
    value, unit = _quantity(text, "bandwidth", _BANDWIDTH_HELP)
    unit = unit.lower()
    size_unit = unit.removesuffix("/s")
    if not unit.endswith("/s") or size_unit not in _SIZE_UNITS:
        raise BudgetError(f"bandwidth {text!r} is not a size per second: write it like {_BANDWIDTH_HELP}")
    return float(_positive_int(value * _SIZE_UNITS[size_unit], text, "bandwidth", _BANDWIDTH_HELP, exact=False))


# ----- dtypes ------------------------------------------------------------------------------------------
WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "fp8", "fp4")
CACHE_DTYPES = ("bf16", "fp16", "fp32", "fp8")
SSM_DTYPES = ("fp32", "bf16", "fp16")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8", "nvfp4": "fp4",
}  # fmt: skip
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}


def normalize_dtype(name: str, allowed: tuple[str, ...] = WEIGHT_DTYPES, what: str = "weight dtype") -> str:
    """'bfloat16' / 'bf16' / 'torch.bfloat16' -> 'bf16', checked against `allowed`."""
    key = str(name).lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in allowed:
        raise BudgetError(f"unknown {what} {name!r}: use {', '.join(allowed)}")
    return key


def compute_dtype(weight_dtype: str) -> str:
    """The dtype activations, the conv state and (by default) the KV cache use with these weights."""
    weight_dtype = normalize_dtype(weight_dtype)
    return weight_dtype if weight_dtype in ("fp32", "fp16") else "bf16"


@dataclass(frozen=True)
class Precision:
    """How a deployment stores its numbers: the weights, the KV cache (None: the compute dtype) and the SSM
    state (None: the config's `mamba_ssm_cache_dtype`). Names are normalized ('bfloat16' -> 'bf16')."""

    weight: str = "bf16"
    kv: str | None = None
    ssm: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", normalize_dtype(self.weight))
        if self.kv is not None:
            object.__setattr__(self, "kv", normalize_dtype(self.kv, CACHE_DTYPES, "KV cache dtype"))
        if self.ssm is not None:
            object.__setattr__(self, "ssm", normalize_dtype(self.ssm, SSM_DTYPES, "SSM state dtype"))

    @classmethod
    def from_options(cls, weight_dtype: str = "bf16", kv_dtype: str | None = None, ssm_dtype: str | None = None):
        """The precision of the `--weight-dtype`, `--kv-dtype` and `--ssm-dtype` options (empty: default)."""
        return cls(weight_dtype, kv_dtype or None, ssm_dtype or None)

    @property
    def compute(self) -> str:
        """The dtype of the activations and the conv state (`compute_dtype`)."""
        return compute_dtype(self.weight)

    def keywords(self) -> dict[str, str | None]:
        """The written form, as the options and a budget record name the dtypes."""
        return {"weight_dtype": self.weight, "kv_dtype": self.kv, "ssm_dtype": self.ssm}


DEFAULT_PRECISION = Precision()  # bf16 weights, the KV cache in the compute dtype, the config's SSM state dtype
