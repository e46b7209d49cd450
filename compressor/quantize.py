"""Quantization with NVIDIA ModelOpt: post-training quantization (PTQ), the pieces quantization-aware
distillation (QAD) needs, the export in ModelOpt's unified Hugging Face format, and reading that format back.

Formats (`FORMATS`), each a ModelOpt config of `modelopt.torch.quantization`:
- fp8: FP8 E4M3 weights and activations, one per-tensor scale each (W8A8);
- nvfp4: NVFP4, 4-bit E2M1 values with an FP8 E4M3 scale per 16 and an fp32 scale per tensor (W4A4);
- int8_sq: INT8 SmoothQuant, per-channel weights, per-tensor activations (W8A8);
- int4_awq: INT4 AWQ, weights only, a scale per 128 inputs (W4A16).

What stays in high precision follows ModelOpt's hybrid (Mamba) recipe `MAMBA_MOE_{FP8,NVFP4}_AGGRESSIVE_CFG`
(modelopt_recipes/configs/ptq/presets/model/mamba_moe_*_aggressive.yaml in nvidia-modelopt 0.47):
ModelOpt's default exclusions (`units/default_disabled_quantizers.yaml`: `*lm_head*`, `*mixer.conv1d*`,
`*router*`, `*mlp.gate.*`, `nn.Embedding`, ...) plus the attention projections (`units/
mamba_moe_disabled_quantizers.yaml`: `*q_proj*`, `*k_proj*`, `*v_proj*`, `*o_proj*`). So the embeddings,
lm_head, every conv1d, the norms, A_log / D / dt_bias and the attention blocks keep the model dtype;
Mamba in_proj / out_proj and MLP up_proj / down_proj are quantized. This matches NVIDIA's published
Nemotron-H checkpoints: Nemotron-Nano-9B-v2-FP8 quantizes "the Mamba and MLP layers" and keeps "all 4
attention layers and the Conv1d components" in BF16 (Model-Optimizer examples/pruning/minitron/
NVIDIA-Nemotron-Nano-9B-v2/README.md); Nemotron-Nano-9B-v2-NVFP4 and Nemotron-3-Nano-30B-A3B-NVFP4 keep
lm_head, every conv1d and every attention block in BF16. (Those NVFP4 releases also keep a few Mamba /
MLP blocks in BF16: the first and last two, or the Mamba block before each attention block; pass such
module patterns as `QuantRecipe.keep`.) The int8_sq and int4_awq configs get the same attention exclusion.
`compressor.budget` sizes fp8 / fp4 weights with this recipe.

MoE blocks: every routed expert's and the shared expert's up_proj / down_proj are quantized, the router
(`mixer.gate`) is not. ModelOpt wraps the MoE mixer in its sparse-MoE module, which calls the mixer with the
hidden states alone (as `HybridLM` calls MLP and MoE mixers) and gives every expert the input range of all
of them, so an expert calibration routed no token to still gets an input scale.

Checkpoint layout (ModelOpt's `export_hf_checkpoint`), per quantized Linear `X` with weight (out, in):
- fp8: `X.weight` float8_e4m3fn (out, in); `X.weight_scale` fp32 scalar amax / 448; `X.input_scale` fp32
  scalar. Dequantized: weight * weight_scale.
- nvfp4: `X.weight` uint8 (out, in / 2), two E2M1 codes a byte, the even column in the low nibble;
  `X.weight_scale` float8_e4m3fn (out, in / 16); `X.weight_scale_2` fp32 scalar amax / (6 * 448);
  `X.input_scale` fp32 scalar. Dequantized: e2m1 * weight_scale (per 16) * weight_scale_2.
- int8_sq: `X.weight` int8 (out, in); `X.weight_scale` fp32 (out,) amax / 127; `X.input_scale` fp32 scalar;
  `X.pre_quant_scale` (in,). Dequantized: weight * weight_scale[:, None] * pre_quant_scale.
- int4_awq: `X.weight` uint8 (out / 2, in), rows 2i and 2i + 1 in the low and high nibble (two's
  complement); `X.weight_scale` (out, in / 128) amax / 7; `X.pre_quant_scale` (in,). Dequantized:
  int4 * weight_scale (per 128) * pre_quant_scale.
`pre_quant_scale` multiplies the input before the matmul (SmoothQuant / AWQ move scale between activations
and weights), so it folds into the weight's columns. Unquantized tensors keep the model dtype. The folder
also holds `hf_quant_config.json` ({"producer", "quantization": {"quant_algo", "kv_cache_quant_algo",
"group_size", "exclude_modules"}}) and `quantization_config` in config.json (compressed-tensors style,
`quant_method: "modelopt"`), which vLLM and TensorRT-LLM read.

The export calls ModelOpt's own exporter (`unified_export_hf._export_transformers_checkpoint`, the path
`export_hf_checkpoint` takes for an in-memory model) on `HybridLM`, whose parameter names are the
checkpoint's; compressor writes the files (ModelOpt would call transformers' `save_pretrained`). Reading
(`compressor.checkpoint.QuantizedCheckpoint`, which `load_model` uses) does not need ModelOpt: it dequantizes
into the compute dtype, and `quantize_activations` fake-quantizes the inputs of the quantized layers at the
checkpoint's input scales, so evaluation on CPU sees W8A8 / W4A4 as deployed (ModelOpt's own NVFP4
fake quantization needs CUDA kernels).

QAD: `prepare_qad` quantizes and calibrates a student (then train it as usual: the fake quantizers pass
gradients straight through); `split_quantizer_state` / `write_quantizer_state` save the calibrated
ranges next to a standard checkpoint of the high-precision weights, `read_quantizer_state` +
`restore_fake_quant` bring a run back (the recipe is re-applied without calibration and the saved ranges
loaded: no pickle, no ModelOpt state object), and `export_qad_checkpoint` writes the quantized export.

ModelOpt is optional (`pip install -e ".[modelopt]"`) and imported only when quantizing or exporting.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from compressor.budget import parameter_counts
from compressor.checkpoint import (
    DEFAULT_SHARD_BYTES,
    QuantizedCheckpoint,
    load_model,
    parse_dtype,
    weight_files,
    write_checkpoint,
)
from compressor.config import ATTENTION, HybridConfig
from compressor.errors import CheckpointError, CompressorError, OptionError
from compressor.model import HybridLM
from compressor.outputs import atomic_output, check_output, save_tensors

# Our format name -> the ModelOpt config (an attribute of modelopt.torch.quantization) it starts from.
FORMATS = {
    "fp8": "MAMBA_MOE_FP8_AGGRESSIVE_CFG",
    "nvfp4": "MAMBA_MOE_NVFP4_AGGRESSIVE_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
}
# ModelOpt's mamba_moe_disabled_quantizers: attention projections stay high precision (already in the
# MAMBA_MOE presets; added to every config so that the generic int8 / int4 ones follow the same recipe).
ATTENTION_KEPT = ("*q_proj*", "*k_proj*", "*v_proj*", "*o_proj*")
TRAINABLE_FORMATS = ("fp8", "nvfp4")  # what QAD offers (ModelOpt's QAD recipes)
CUDA_ONLY_FORMATS = ("nvfp4",)  # ModelOpt's NVFP4 fake quantization runs only with its CUDA kernels
# Inputs per scale along a row: NVFP4 blocks and AWQ groups (the exporter refuses partial blocks).
BLOCK_SIZES = {"nvfp4": 16, "int4_awq": 128}
HF_QUANT_CONFIG = "hf_quant_config.json"
QUANTIZABLE = (nn.Linear, nn.Conv1d)  # the modules ModelOpt gives quantizers in HybridLM
QUANTIZER_STATE_FILE = "quantizer_state.safetensors"
INSTALL_HINT = 'pip install -e ".[modelopt]"'

# ----- recipe -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantRecipe:
    """A quantization format and the modules kept in high precision beyond the recipe's own.

    `keep` holds ModelOpt quantizer-name patterns (fnmatch against names such as
    `backbone.layers.0.mixer.in_proj.weight_quantizer`), e.g. `*layers.0.*` keeps block 0 unquantized.
    """

    format: str
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CompressorError(f"unknown quantization format {self.format!r}: use {', '.join(FORMATS)}")
        object.__setattr__(self, "keep", tuple(self.keep))

    def modelopt_config(self) -> dict[str, Any]:
        """The ModelOpt quantize config: the format's preset plus our exclusions (a fresh copy)."""
        mtq = _modelopt()
        config = copy.deepcopy(getattr(mtq, FORMATS[self.format]))
        kept = ATTENTION_KEPT + self.keep
        config["quant_cfg"] = [*config["quant_cfg"], *({"quantizer_name": p, "enable": False} for p in kept)]
        return config

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "keep": list(self.keep)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QuantRecipe:
        return cls(format=raw["format"], keep=tuple(raw.get("keep", ())))


def _modelopt():
    """`modelopt.torch.quantization`, imported on first use (it takes seconds)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "transformers X is not tested with this modelopt"
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise CompressorError(
            f"quantization needs nvidia-modelopt ({exc.name or exc} is missing): install it with {INSTALL_HINT}"
        ) from None
    return mtq


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ModelOpt prints progress ("Inserted 84 quantizers") and version warnings; keep the CLI's output clean."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----- post-training quantization ------------------------------------------------------------------------


def quantize(
    model: HybridLM,
    recipe: QuantRecipe | str,
    batches: Iterable[torch.Tensor],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> HybridLM:
    """Quantize `model` in place with ModelOpt and calibrate it on `batches` of token ids (batch, seq_len).

    Calibration runs compressor's own forward over the batches (without the output head, which stays
    unquantized); SmoothQuant and AWQ pass over them more than once. Returns the fake-quantized model:
    evaluate or train it as is (NVFP4 needs CUDA to run), export it with `export_quantized`.
    `on_batch(tokens)` is called after each calibration batch.
    """
    recipe = QuantRecipe(recipe) if isinstance(recipe, str) else recipe
    if is_quantized(model):
        raise CompressorError("the model is already quantized: start again from the unquantized checkpoint")
    _check_block_sizes(model, recipe.format)
    _check_keep(model, recipe.keep)
    mtq = _modelopt()
    device = model.lm_head.weight.device
    batches = list(batches)
    if not batches:
        raise CompressorError("no calibration data: quantization needs at least one batch of token ids")

    def forward_loop(module: nn.Module) -> None:
        with torch.no_grad():
            for ids in batches:
                module(ids.to(device), head=lambda hidden, weight: None)  # the head is not quantized
                if on_batch is not None:
                    on_batch(ids.numel())

    with _quiet():
        mtq.quantize(model, recipe.modelopt_config(), forward_loop)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether ModelOpt quantizers have been inserted into `model`."""
    return any(type(m).__name__ == "TensorQuantizer" for m in model.modules())


def _check_keep(model: HybridLM, keep: tuple[str, ...]) -> None:
    """Refuse a `keep` pattern that names no quantizer ModelOpt would insert (a typo would keep nothing and
    quantize what was meant to stay): each must match an `<module>.<input|weight|output>_quantizer` name."""
    names = [f"{name}.{kind}_quantizer" for name, module in model.named_modules() if isinstance(module, QUANTIZABLE)
             for kind in ("input", "weight", "output")]  # fmt: skip
    for pattern in keep:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise OptionError(
                "keep",
                f"pattern {pattern!r} matches no quantizer of the model (their names look like "
                f"{names[0]}): it would keep nothing",
            )


def _check_block_sizes(model: HybridLM, fmt: str) -> None:
    """Refuse widths the format cannot pack (before the calibration time is spent)."""
    block = BLOCK_SIZES.get(fmt)
    if block is None:
        return
    for index, layer in enumerate(model.backbone.layers):
        if layer.kind == ATTENTION:
            continue
        for name, linear in layer.mixer.named_modules():  # MoE experts' projections included
            if not isinstance(linear, nn.Linear):
                continue
            if linear.in_features % block or (fmt == "int4_awq" and linear.out_features % 2):
                raise CompressorError(
                    f"{fmt} packs {block} inputs per scale, but backbone.layers.{index}.mixer.{name} has "
                    f"{linear.in_features} inputs and {linear.out_features} outputs: choose another format"
                )


# ----- export --------------------------------------------------------------------------------------------


def export_quantized(
    model: HybridLM,
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer_from: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a quantized `model` as a ModelOpt unified Hugging Face checkpoint folder, atomically.

    Quantized weights and their scales come from ModelOpt's exporter; unquantized tensors are written in
    `dtype` (default: the model's). The model is consumed: its weights are replaced by the packed ones.
    """
    if not is_quantized(model):
        raise CompressorError("the model is not quantized: run quantize() (or prepare_qad) first")
    check_output(path, overwrite=overwrite)
    dtype = parse_dtype(dtype) or model.lm_head.weight.dtype
    plain = {name for name in model.state_dict() if not _is_quantizer_tensor(name)}
    state, hf_quant_config, quantization_config = _modelopt_export(model, dtype)
    state = {
        name: tensor.to(dtype) if name in plain and tensor.is_floating_point() and tensor.element_size() > 1 else tensor
        for name, tensor in state.items()
    }
    if model.config.tie_word_embeddings and "backbone.embeddings.weight" not in state:
        state["backbone.embeddings.weight"] = state.pop("lm_head.weight")  # ModelOpt kept the other side
    config = model.config.replace(extra={**model.config.extra, "quantization_config": quantization_config})
    with atomic_output(path, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, config, state, tokenizer_from=tokenizer_from, max_shard_bytes=max_shard_bytes)
        raw = json.loads((tmp / "config.json").read_text())
        for key in {"dtype", "torch_dtype"} & set(raw):  # the model's, not the first tensor's (maybe packed)
            raw[key] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        (tmp / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant_config, indent=4) + "\n")
    return Path(path)


def _modelopt_export(
    model: HybridLM, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(state dict with packed weights and scales, hf_quant_config.json, config.json's quantization_config)
    from ModelOpt's exporter."""
    _modelopt()
    from modelopt.torch.export import convert_hf_quant_config_format
    from modelopt.torch.export.unified_export_hf import _export_transformers_checkpoint

    # The exporter is written for transformers models: it runs a dummy forward on `model.device` to find
    # layers sharing an input. HybridLM has no such attribute, so lend it one for the call.
    lend = not hasattr(model, "device")
    if lend:
        model.device = model.lm_head.weight.device
    try:
        with _quiet(), torch.no_grad():
            state, hf_quant_config = _export_transformers_checkpoint(model, dtype)
    finally:
        if lend:
            del model.device
    if not hf_quant_config["quantization"].get("quant_algo"):
        raise CompressorError("nothing was quantized: every layer matched an exclusion of the recipe")
    state = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    return state, hf_quant_config, convert_hf_quant_config_format(hf_quant_config)


# ----- quantization-aware distillation -------------------------------------------------------------------


def prepare_qad(student: HybridLM, recipe: QuantRecipe | str, batches: Iterable[torch.Tensor]) -> HybridLM:
    """ModelOpt's QAD recipe, first half: quantize and calibrate the student, then hand it back in train
    mode. Train it as usual (create the optimizer afterwards); the fake quantizers pass gradients straight
    through to the high-precision weights and keep their calibrated ranges."""
    recipe = QuantRecipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.format not in TRAINABLE_FORMATS:
        raise CompressorError(
            f"quantization-aware training supports {', '.join(TRAINABLE_FORMATS)}, not {recipe.format}"
        )
    _check_runs_on(recipe.format, student.lm_head.weight.device)
    return quantize(student, recipe, batches).train()


def _check_runs_on(fmt: str, device: torch.device) -> None:
    if fmt in CUDA_ONLY_FORMATS and device.type != "cuda":
        raise CompressorError(
            f"{fmt} fake quantization needs a CUDA GPU (ModelOpt's kernels); on CPU use fp8, or quantize "
            "without training and evaluate the export"
        )


def _is_quantizer_tensor(name: str) -> bool:
    """A ModelOpt quantizer's buffer (`...in_proj.input_quantizer._amax`), not a model weight."""
    return any(part.endswith("_quantizer") for part in name.split(".")[:-1])


def split_quantizer_state(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, quantizer tensors) of a fake-quantized model's state dict: the weights form a
    standard checkpoint, the quantizer tensors (calibrated ranges) go to `write_quantizer_state`."""
    weights = {k: v for k, v in state_dict.items() if not _is_quantizer_tensor(k)}
    quantizers = {k: v for k, v in state_dict.items() if _is_quantizer_tensor(k)}
    return weights, quantizers


def write_quantizer_state(folder: str | Path, recipe: QuantRecipe, tensors: dict[str, torch.Tensor]) -> None:
    """Save the quantizer tensors and the recipe (as safetensors metadata) in a checkpoint folder."""
    metadata = {"format": "pt", "quant_recipe": json.dumps(recipe.to_dict())}
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    save_tensors(tensors, Path(folder) / QUANTIZER_STATE_FILE, metadata=metadata)


def read_quantizer_state(folder: str | Path) -> tuple[QuantRecipe, dict[str, torch.Tensor]] | None:
    """The (recipe, quantizer tensors) saved in a checkpoint folder, or None when it holds none."""
    path = Path(folder) / QUANTIZER_STATE_FILE
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("quant_recipe")
    if raw is None:
        raise CheckpointError(f"{path} has no quant_recipe metadata: it was not written by compressor")
    return QuantRecipe.from_dict(json.loads(raw)), load_file(path)


def restore_fake_quant(model: HybridLM, recipe: QuantRecipe, tensors: dict[str, torch.Tensor]) -> HybridLM:
    """Make `model` the fake-quantized model whose quantizer tensors were saved: insert the recipe's
    quantizers without calibrating, then load the calibrated ranges (and smoothing scales)."""
    mtq = _modelopt()
    config = {**recipe.modelopt_config(), "algorithm": None}  # no calibration: the ranges are loaded
    with _quiet():
        mtq.quantize(model, config)
    device = model.lm_head.weight.device
    for name, tensor in tensors.items():
        owner, _, buffer = name.rpartition(".")
        try:
            quantizer = model.get_submodule(owner)
        except AttributeError:
            raise CheckpointError(f"saved quantizer tensor {name} has no quantizer in the model") from None
        quantizer.register_buffer(buffer, tensor.to(device))
    return model


def export_qad_checkpoint(
    folder: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Export a quantization-aware training checkpoint (weights + `quantizer_state.safetensors`) as a
    quantized ModelOpt checkpoint: load the high-precision weights, restore the fake quantizers, export."""
    saved = read_quantizer_state(folder)
    if saved is None:
        raise CheckpointError(f"{folder} holds no {QUANTIZER_STATE_FILE}: it is not a quantization-aware run's model")
    model = load_model(folder, dtype="float32")
    restore_fake_quant(model, *saved)
    return export_quantized(model, out, dtype=dtype, tokenizer_from=folder, overwrite=overwrite)


# ----- reading quantized checkpoints (no ModelOpt needed) -----------------------------------------------


def is_quantized_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint folder holds a quantized export (`quantization_config` in its config.json)."""
    return HybridConfig.from_file(path).is_quantized


def quantize_activations(model: HybridLM, path: str | Path) -> list[torch.utils.hooks.RemovableHandle]:
    """Fake-quantize the inputs of `model`'s quantized layers at the input scales stored in the quantized
    checkpoint `path` (FP8, NVFP4, INT8; weight-only formats have none), so a model loaded (dequantized)
    from it computes as the deployed W8A8 / W4A4 model does, on any device. Returns the hook handles."""
    checkpoint = QuantizedCheckpoint.read(path, device=model.lm_head.weight.device)
    if checkpoint is None:
        raise CheckpointError(f"{path} is not a quantized checkpoint (no quantization_config in config.json)")
    handles = []
    for name, layer in checkpoint.layers.items():
        if layer.input_scale is not None:
            hook = lambda module, args, layer=layer: (layer.quantize_input(args[0]), *args[1:])  # noqa: E731
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    return handles


# ----- stored sizes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredWeights:
    """Bytes of a checkpoint's tensors as stored: by component (the keys of `budget.parameter_counts`,
    scales counted with their weight) and by safetensors dtype; `quant_algo` None when unquantized."""

    by_component: dict[str, int]
    by_dtype: dict[str, int]
    quant_algo: str | None

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    @property
    def budget_dtype(self) -> str | None:
        """The `compressor.budget` weight dtype that sizes this checkpoint (fp8, fp4), None if it has none."""
        return {"FP8": "fp8", "NVFP4": "fp4"}.get(self.quant_algo)


def stored_weight_bytes(path: str | Path) -> StoredWeights:
    """What a checkpoint's weights take, read from the safetensors headers (no tensor is loaded)."""
    config = HybridConfig.from_file(path)
    quant_config = config.extra.get("quantization_config") or {}
    by_component = dict.fromkeys(parameter_counts(config), 0)
    by_dtype: dict[str, int] = {}
    for file in sorted(set(weight_files(path).values())):
        for name, entry in _safetensors_header(file).items():
            start, end = entry["data_offsets"]
            by_component[_component(name, config)] += end - start
            by_dtype[entry["dtype"]] = by_dtype.get(entry["dtype"], 0) + end - start
    return StoredWeights(by_component, by_dtype, quant_config.get("quant_algo"))


def _safetensors_header(file: Path) -> dict[str, Any]:
    with file.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return header


def _component(name: str, config: HybridConfig) -> str:
    if name.startswith("backbone.embeddings."):
        return "embeddings"
    if name.startswith("lm_head."):
        return "lm_head"
    parts = name.split(".")
    if name.startswith("backbone.layers.") and parts[3] == "mixer":
        return config.block(int(parts[2])).kind
    return "norms"
