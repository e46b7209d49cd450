"""Checkpoint I/O: Hugging Face `nemotron_h` folders <-> `HybridLM`.

A checkpoint folder holds `config.json`, weights as `model.safetensors` or shards listed in
`model.safetensors.index.json`, and tokenizer files. Only safetensors are read: pickle-based weights
(`pytorch_model.bin`, `.pt`) can run arbitrary code when loaded and are refused. The MoE router's tensors
(`compressor.model.FP32_TENSORS`) stay in fp32 whatever dtype the rest is loaded in, as transformers keeps
them. A quantized export (ModelOpt's unified format: `compressor.quantize`) is dequantized on load, with the
scales `QuantizedCheckpoint` reads.

Memory: a model's weights are never held twice, whatever its size.
- Loading builds the model on the meta device (`empty_model`) and gives it its tensors one at a time
  (`materialize`): a tensor already in the wanted dtype is the file's memory map, read when first used;
  under several processes the empty model is sharded first and each keeps only its rows.
- Saving (`write_weights`) lays the shards out from the tensors' shapes and dtypes, then writes each tensor
  straight from its memory at its offset, so the tensors may come one at a time from a generator (pruning
  writes a checkpoint without ever building the pruned model).
- `init_checkpoint` fills an empty model in the target dtype: a bf16 model never exists in fp32.

Every folder written here carries a complete tokenizer: the source's tokenizer files are copied, and
when the source has `tokenizer.json` but no `tokenizer_config.json`, one is derived (BOS/EOS/PAD at the
ids config.json names, spelled as the tokenizer spells them), so `transformers.AutoTokenizer` and tools
built on it (lm-eval's HF backend, vLLM) know the special tokens.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from compressor import distributed
from compressor.config import MOE, PUZZLE, PUZZLE_CONFIG_MODULE, HybridConfig
from compressor.errors import CheckpointError, first_line
from compressor.model import FP32_TENSORS, HybridLM, tensor_shapes
from compressor.outputs import atomic_output, confined, open_tensors, read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files copied from the source checkpoint so the output is usable as is (data only, never code).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# config.json id field of each special token written into a derived tokenizer_config.json.
SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "pad_token_id"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEFAULT_SHARD_BYTES = 5 * 2**30
# safetensors dtypes a model weight may be stored in (a quantized export's packed weights aside)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# safetensors' names of the dtypes a checkpoint may hold
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return DTYPES[key]


def weight_files(path: str | Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it; clear errors for anything else. Every file
    must lie inside the folder (an index naming `../x` or an absolute path is refused, as is a link out of
    it, but for the blob store of a Hugging Face cache snapshot)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: point at a checkpoint folder holding config.json")
    index = path / INDEX_NAME
    if index.is_file():
        confined(index, path, what=INDEX_NAME)
        weight_map = read_json(index, "a valid safetensors index", error=CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
        for file in weight_map.values():
            if not file or "\x00" in file:
                raise CheckpointError(f"{index}: 'weight_map' names the shard {file[:40]!r}, which is not a file name")
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            confined(file, path, what=f"shard {file.name} listed in {INDEX_NAME}")
            if not file.is_file():
                raise CheckpointError(f"shard {file.name} listed in {INDEX_NAME} is missing from {path}")
        return files
    single = path / WEIGHTS_NAME
    if single.is_file():
        confined(single, path, what=WEIGHTS_NAME)
        with open_weights(single) as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{path} holds pickle-based weights ({', '.join(pickled)}); compressor loads safetensors only, "
            "because unpickling can execute arbitrary code: convert them to safetensors in a trusted environment"
        )
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}")


def open_weights(file: Path, device: str = "cpu"):
    """`safe_open` of a weight file, with a damaged, truncated or unreadable file reported as one line."""
    return open_tensors(file, "safetensors", device=device, error=CheckpointError)


def stored_dtypes(path: str | Path) -> list[str]:
    """The dtypes the checkpoint's weight files store (safetensors names: F32, BF16, ...)."""
    seen = set()
    for file in sorted(set(weight_files(path).values())):
        with open_weights(file) as f:
            seen.update(f.get_slice(name).get_dtype() for name in f.keys())  # noqa: SIM118
    return sorted(seen)


def fingerprint(path: str | Path) -> str:
    """A short hash identifying a checkpoint's architecture and weights, cheap for any size.

    It covers config.json (canonical form), and for each weight file its size, its safetensors header
    (names, shapes, dtypes, offsets) and its first and last MiB of data; a changed tensor anywhere changes
    it only if it lands there, which catches re-saved, retrained and pruned checkpoints in practice.
    """
    import hashlib

    path = Path(path)
    digest = hashlib.sha256(HybridConfig.from_file(path).to_json().encode())
    for file in sorted(set(weight_files(path).values())):
        try:
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with file.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header_len, size)))
                digest.update(f.read(2**20))
                f.seek(max(8 + header_len, size - 2**20))
                digest.update(f.read())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file} cannot be read ({first_line(exc)})") from None
    return digest.hexdigest()[:16]


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    world: distributed.World | None = None,
    frozen: bool = True,
) -> HybridLM:
    """Load a checkpoint folder into a `HybridLM` in eval mode.

    dtype None keeps the checkpoint's dtype (config.json `dtype`/`torch_dtype`, else the stored one). The
    router tensors of MoE blocks are loaded in fp32 in any case. A quantized checkpoint (ModelOpt export:
    `quantization_config` in config.json) is dequantized into `dtype` (default: config.json's, else
    bfloat16); see `compressor.quantize`. With a `world` of several processes the model is sharded across
    them (`compressor.distributed.shard`; `frozen` False for a model to be trained): each process reads and
    keeps only its rows of what is sharded.
    """
    path = Path(path)
    config = HybridConfig.from_file(path)
    files = weight_files(path)
    dtype = parse_dtype(dtype) or parse_dtype(config.extra.get("dtype") or config.extra.get("torch_dtype"))
    quantized = QuantizedCheckpoint.read(path, config)
    _check_architecture(path, config, files, quantized)  # before anything of config.json's size is built
    if quantized is not None:
        dtype = dtype or torch.bfloat16
        config.extra.pop("quantization_config")  # the loaded model holds plain weights
    model = empty_model(config, dtype or _first_stored_dtype(files))
    world = world or distributed.World(device=torch.device(device))
    distributed.shard(model, world, frozen=frozen)
    materialize(model, _stored_tensors(files, model, quantized, one_map_each=world.distributed), world)
    broken = nonfinite_tensors(model)
    if distributed.all_reduce_sum([len(broken)], world)[0]:  # every process stops, also those whose rows are fine
        where = f"{broken[0]}{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}" if broken else "elsewhere"
        raise CheckpointError(
            f"checkpoint {path} holds NaN or infinite weights ({where}): it is damaged or diverged in training; "
            "use an earlier checkpoint"
        )
    return model.eval()


def check_weights(path: str | Path, config: HybridConfig | None = None) -> HybridConfig:
    """Refuse (one CheckpointError) a checkpoint folder whose config.json and weights disagree, from the
    safetensors headers alone: what `compress info` reports and `load_model` checks before building. Returns
    the config, which may then be sized (a memory plan) before the model is loaded."""
    path = Path(path)
    config = config or HybridConfig.from_file(path)
    _check_architecture(path, config, weight_files(path), QuantizedCheckpoint.read(path, config))
    return config


def _check_architecture(
    path: Path, config: HybridConfig, files: dict[str, Path], quantized: QuantizedCheckpoint | None
) -> None:
    """config.json against the weights' headers. The counts that decide how much a model is first, each
    compared with what the files hold: the blocks, then each MoE block's experts (so a config.json of
    200,000 blocks or 10^9 experts over a small checkpoint is refused before a module is made); then every
    tensor's name, shape and dtype (floating point, but for a quantized layer's packed weight and scales)."""
    stored: dict[str, tuple[tuple[int, ...], str, str]] = {}  # name -> (shape, safetensors dtype, file name)
    for file in sorted(set(files.values())):
        with open_weights(file) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                view = f.get_slice(name)
                stored[name] = (tuple(view.get_shape()), view.get_dtype(), file.name)
    blocks, experts = set(), {}  # block indices; MoE block index -> experts held
    for name in stored:
        parts = name.split(".")
        block = _index(parts[2]) if name.startswith("backbone.layers.") else None
        if block is not None:
            blocks.add(block)
            expert = _index(parts[5]) if parts[3:5] == ["mixer", "experts"] and len(parts) > 5 else None
            if expert is not None:
                experts[block] = max(experts.get(block, 0), expert + 1)
    held = max(blocks, default=-1) + 1
    if held != config.num_blocks:
        raise CheckpointError(
            f"config.json of {path} describes {config.num_blocks:,} blocks, but its weights hold {held:,}: do the "
            "config and the weights belong together?"
        )
    for spec in config.blocks:
        if spec.kind == MOE and experts.get(spec.index, 0) != spec.n_routed_experts:
            raise CheckpointError(
                f"config.json of {path} gives block {spec.index} {spec.n_routed_experts:,} experts, but its weights "
                f"hold {experts.get(spec.index, 0):,}: do the config and the weights belong together?"
            )
    expected = tensor_shapes(config)
    tied = config.tie_word_embeddings
    if tied:
        del expected["lm_head.weight"]  # stored once, as the embeddings
    for name, (shape, dtype, file) in stored.items():
        if (tied and name == "lm_head.weight") or (quantized is not None and quantized.is_companion(name)):
            continue
        if name not in expected:
            raise CheckpointError(
                f"tensor {name} in {file} is not part of the architecture in config.json; "
                "do the config and the weights belong together?"
            )
        layer = quantized.layer(name) if quantized is not None else None
        if layer is not None:
            shape = layer.logical_shape(shape)
        elif dtype not in FLOAT_DTYPES:  # a cast would load other values than were saved
            raise CheckpointError(
                f"tensor {name} in {file} is stored as {dtype}, but a model's weights are floating point: the "
                "checkpoint is damaged or holds something else"
            )
        if shape != expected[name]:
            raise CheckpointError(
                f"tensor {name} has shape {list(shape)} in {file}, but config.json implies {list(expected[name])}"
            )
    missing = sorted(set(expected) - set(stored))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint {path} lacks tensor(s) {', '.join(missing[:3])}{more}")


def _index(part: str) -> int | None:
    """A block or expert index from a tensor name's part ('12'), None when it is not one."""
    return int(part) if part.isascii() and part.isdigit() and len(part) <= 9 else None


def empty_model(config: HybridConfig, dtype: torch.dtype) -> HybridLM:
    """`config`'s model on the meta device (no memory), every tensor in `dtype` but the MoE routers'
    (`FP32_TENSORS`, fp32): what loading, pruning and initialisation fill tensor by tensor."""
    with torch.device("meta"):
        model = HybridLM(config).to(dtype)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(FP32_TENSORS):
            tensor.data = tensor.data.float()
    return model


@torch.no_grad()
def materialize(model: HybridLM, tensors: Iterable[tuple[str, torch.Tensor]], world: distributed.World) -> set[str]:
    """Give an empty (meta) model its tensors, one (name, whole tensor) at a time, on `world.device`, each
    cast to the dtype the empty model has for it; returns the names given. A model sharded across several
    processes keeps this process's rows of each (`distributed.local_rows`); otherwise each tensor is placed
    as it is when its device and dtype are right (no copy). Tied embeddings are tied again at the end."""
    sharded = distributed.is_sharded(model)
    if sharded:
        model.to_empty(device=world.device)
    given = set()
    for name, tensor in tensors:
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, attribute)
        if sharded:
            local = current.to_local() if hasattr(current, "to_local") else current  # buffers are not sharded
            rows = distributed.local_rows(tensor, world) if local is not current else tensor
            local.copy_(rows)
        else:
            value = tensor.detach().to(device=world.device, dtype=current.dtype)
            is_parameter = isinstance(current, torch.nn.Parameter)
            setattr(module, attribute, torch.nn.Parameter(value, current.requires_grad) if is_parameter else value)
        given.add(name)
    if model.config.tie_word_embeddings and not sharded:
        model.lm_head.weight = model.backbone.embeddings.weight
    return given


def _stored_tensors(
    files: dict[str, Path], model: HybridLM, quantized: QuantizedCheckpoint | None = None, *, one_map_each: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors one at a time, as stored (memory-mapped: read when used; quantized layers of
    a `QuantizedCheckpoint` dequantized), for `model` (an empty model of config.json, which
    `_check_architecture` has held against the files). With `one_map_each` every tensor maps its file anew,
    so the pages it read leave memory with it: what a sharded model, which copies a few rows of each, needs
    (one map per file would keep every page read until the file is done)."""
    tied = model.config.tie_word_embeddings
    for file in sorted(set(files.values())):
        with open_weights(file) as f:
            for name in list(f.keys()):
                if (tied and name == "lm_head.weight") or (quantized is not None and quantized.is_companion(name)):
                    continue
                layer = quantized.layer(name) if quantized is not None else None
                if not one_map_each:
                    tensor = f.get_tensor(name)
                else:
                    with open_weights(file) as alone:
                        tensor = alone.get_tensor(name)
                yield name, layer.dequantize(tensor) if layer is not None else tensor
                del tensor


def _first_stored_dtype(files: dict[str, Path]) -> torch.dtype:
    """The dtype of the first stored tensor that is not a router's (what a checkpoint without a dtype in
    config.json is loaded in)."""
    for file in sorted(set(files.values())):
        with open_weights(file) as f:
            for name in f.keys():  # noqa: SIM118
                if not name.endswith(FP32_TENSORS):
                    return f.get_tensor(name).dtype
    return torch.float32


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or infinity (in this process's rows when sharded)."""
    names = []
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not torch.isfinite(local).all():
            names.append(name)
    return names


def write_checkpoint(
    folder: Path,
    config: HybridConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
    tokenizer_from: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write config.json, the weights and the tokenizer files into an existing (temporary) folder.

    `state_dict` gives every tensor's name, shape and dtype (meta tensors will do); the data comes from
    `tensors` when given (each name once, in any order, one at a time: see `write_weights`), else from
    `state_dict` itself."""
    layout = dict(state_dict)
    if config.tie_word_embeddings:
        layout.pop("lm_head.weight", None)  # stored once, as the embeddings
    stream = layout.items() if tensors is None else ((n, t) for n, t in tensors if n in layout)
    write_weights(folder, layout, stream, max_shard_bytes=max_shard_bytes)
    raw = config.to_dict()
    raw["dtype"] = str(next(iter(layout.values())).dtype).removeprefix("torch.")
    if "torch_dtype" in raw:
        raw["torch_dtype"] = raw["dtype"]
    (folder / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    if config.served_format == PUZZLE:  # the configuration module its auto_map names
        module = f"{PUZZLE_CONFIG_MODULE}.py"
        shutil.copyfile(Path(__file__).with_name(module), folder / module)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_from) / name
            if source.is_file():  # its content only, never a link out of the source folder
                shutil.copyfile(confined(source, Path(tokenizer_from), what=name), folder / name)
                (folder / name).chmod(0o644)
        complete_tokenizer(folder, config)


def special_tokens(tokenizer_file: str | Path, config: HybridConfig) -> dict[str, str]:
    """{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}: the tokens at config.json's ids.

    A token whose id is unset in the config (or outside the tokenizer's vocabulary) is left out.
    """
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"cannot read tokenizer {tokenizer_file} ({err})") from None
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_id, "pad_token_id": config.pad_token_id}
    tokens = {}
    for name, id_field in SPECIAL_TOKEN_IDS.items():
        token = tokenizer.id_to_token(ids[id_field]) if isinstance(ids[id_field], int) else None
        if token is not None:
            tokens[name] = token
    return tokens


def complete_tokenizer(folder: str | Path, config: HybridConfig) -> list[str]:
    """Derive tokenizer_config.json and special_tokens_map.json in a folder holding tokenizer.json.

    Nothing is changed when the folder has no tokenizer.json or already has a tokenizer_config.json (the
    source's own is kept as it is). Returns the names of the files written.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return []
    tokens = special_tokens(folder / "tokenizer.json", config)
    # PreTrainedTokenizerFast wraps tokenizer.json as it is (transformers 4 and 5): no template tokens
    # added on encoding, and decoding keeps the tokenizer's own spacing.
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **tokens}
    written = ["tokenizer_config.json"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    if not (folder / "special_tokens_map.json").is_file():
        (folder / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2, sort_keys=True) + "\n")
        written.append("special_tokens_map.json")
    return written


def write_weights(
    folder: Path,
    layout: Mapping[str, torch.Tensor],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write `model.safetensors`, or shards of at most `max_shard_bytes` (but one tensor) plus
    `model.safetensors.index.json`, with the names, shapes and dtypes of `layout` (in its order), filled from
    `tensors`: (name, tensor) pairs, each name once, in any order. Each tensor is written at its offset
    straight from its memory and then let go, so memory holds one tensor of the stream at a time.

    The files are standard safetensors (a JSON header of dtypes, shapes and data offsets, then the data);
    within a file, tensors are ordered by element size, largest first, so each starts aligned."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in layout.items():
        nbytes = _nbytes(tensor)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = [folder / WEIGHTS_NAME] if len(shards) == 1 else [
        folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]  # fmt: skip
    handles = []
    try:
        where: dict[str, tuple[int, int]] = {}  # name -> (file, byte offset of its data)
        for index, (names, file) in enumerate(zip(shards, files, strict=True)):
            handles.append(open(file, "wb"))  # noqa: SIM115 (closed below, all together)
            for name, offset in _write_header(handles[-1], layout, names).items():
                where[name] = (index, offset)
        written = set()
        for name, tensor in tensors:
            expected = layout[name]
            if name in written or tuple(tensor.shape) != tuple(expected.shape):
                raise CheckpointError(f"cannot write tensor {name}: given twice or with the wrong shape")
            data = tensor.detach().to(device="cpu", dtype=expected.dtype).contiguous().reshape(-1)
            index, offset = where[name]
            handles[index].seek(offset)
            handles[index].write(data.view(torch.uint8).numpy().data)
            written.add(name)
    except OSError as exc:  # e.g. "No space left on device"
        raise CheckpointError(f"writing the weights into {folder} failed ({first_line(exc)})") from None
    finally:
        for handle in handles:
            handle.close()
    if written != set(layout):
        missing = sorted(set(layout) - written)
        raise CheckpointError(f"no data was given for tensor(s) {', '.join(missing[:3])}")
    for file in files:
        file.chmod(0o644)  # a checkpoint is meant to be shared
    if len(shards) > 1:
        weight_map = {name: files[index].name for name, (index, _) in where.items()}
        total = sum(_nbytes(t) for t in layout.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_header(handle, layout: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, int]:
    """A safetensors header for the tensors `names` of `layout` (sorted by element size, largest first);
    returns where each one's data goes in the file."""
    names = sorted(names, key=lambda n: -layout[n].element_size())  # stable: layout order within a size
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        tensor = layout[name]
        header[name] = {"dtype": _safetensors_dtype(tensor.dtype), "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + _nbytes(tensor)]}  # fmt: skip
        offset += _nbytes(tensor)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    handle.write(len(encoded).to_bytes(8, "little") + encoded)
    return {name: 8 + len(encoded) + header[name]["data_offsets"][0] for name in names}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _safetensors_dtype(dtype: torch.dtype) -> str:
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"cannot store {dtype} in safetensors")
    return SAFETENSORS_DTYPES[dtype]


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint's weight files (what a copy or a pruned child of it needs at most)."""
    return sum(file.stat().st_size for file in set(weight_files(path).values()))


def save_model(
    model: HybridLM,
    path: str | Path,
    *,
    tokenizer_from: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a standard checkpoint folder, atomically.

    Weights go to `model.safetensors`, or to shards plus an index when larger than `max_shard_bytes`;
    `tokenizer_from` (a checkpoint folder) provides the tokenizer files to copy through.
    """
    with atomic_output(path, overwrite=overwrite) as tmp:
        write_checkpoint(
            tmp, model.config, model.state_dict(), tokenizer_from=tokenizer_from, max_shard_bytes=max_shard_bytes
        )
    return Path(path)


def init_checkpoint(
    out: str | Path,
    config: HybridConfig,
    *,
    tokenizer: str | Path | None = None,
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
) -> int:
    """Write a randomly initialised model of `config` as a checkpoint (with `tokenizer`, a folder holding
    tokenizer.json or the file itself); returns its parameter count. Refuses when the model would not fit
    in memory or the tokenizer has more tokens than the vocabulary."""
    import tempfile

    from compressor.budget import available_memory, num_parameters
    from compressor.data import tokenizer_file
    from compressor.outputs import check_free_space, check_output

    check_output(out, overwrite=overwrite, inputs=(tokenizer_file(tokenizer),))
    torch_dtype = parse_dtype(dtype)
    params = num_parameters(config)
    needed = params * torch.empty(0, dtype=torch_dtype).element_size()
    available = available_memory("cpu")
    if available is not None and needed > 0.9 * available:
        raise CheckpointError(
            f"a {params:,}-parameter model needs {needed / 2**30:.1f} GiB in {dtype}, but only "
            f"{available / 2**30:.1f} GiB of memory is available"
        )
    check_free_space(out, needed, f"a {params:,}-parameter checkpoint in {dtype}")
    with tempfile.TemporaryDirectory() as staging:
        tokenizer_from = None
        if tokenizer is not None:
            from compressor.data import load_tokenizer

            vocab = load_tokenizer(tokenizer).get_vocab_size()
            if vocab > config.vocab_size:
                raise CheckpointError(
                    f"the tokenizer has {vocab} tokens but the model's vocab_size is {config.vocab_size}: "
                    f"add --set vocab_size={vocab}"
                )
            source = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
            shutil.copyfile(source, Path(staging) / "tokenizer.json")
            tokenizer_from = staging
        model = empty_model(config, torch_dtype).to_empty(device="cpu")  # memory once, in the target dtype
        model.reset_parameters(torch.Generator().manual_seed(seed))
        save_model(model, out, tokenizer_from=tokenizer_from, overwrite=overwrite)
    return params


# ----- quantized checkpoints: the scales of a ModelOpt export (no ModelOpt needed) ----------------------
# The layout is written out in `compressor.quantize`, which exports it; `load_model` dequantizes with these.

# quant_algo values compressor can read (hf_quant_config / quantization_config); MIXED_PRECISION mixes them.
READABLE_ALGOS = ("FP8", "NVFP4", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "MIXED_PRECISION")
# Tensors that accompany a Linear's weight in the export (KV-cache scales sit on k_proj / v_proj).
COMPANIONS = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")
E4M3_MAX, E2M1_MAX = 448.0, 6.0
# E2M1 code (sign bit 3, magnitude bits 0-2) -> value, as ModelOpt's NVFP4QTensor defines it.
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # midpoints between magnitudes
_E2M1_ROUND_UP = torch.tensor([0.75, 1.75, 3.5])  # ties that round to the even code above


@dataclass
class QuantizedLinear:
    """The stored scales of one quantized Linear; `algo` is fp8, nvfp4, int8 or int4 (the weight's layout)."""

    algo: str
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    pre_quant_scale: torch.Tensor | None = None

    def logical_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """(out, in) of the weight from its stored shape."""
        if self.algo == "nvfp4":
            return (stored[0], 2 * stored[1])  # two values a byte along the row
        if self.algo == "int4":
            return (self.weight_scale.shape[0], stored[1])  # two rows a byte
        return tuple(stored)

    def dequantize(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight in fp32, scales (and the smoothing scale) applied."""
        if self.algo == "fp8":
            scale = self.weight_scale.float()
            weight = weight.float() * (scale[:, None] if scale.ndim == 1 else scale)
        elif self.algo == "int8":
            weight = weight.float() * self.weight_scale.float()[:, None]
        elif self.algo == "nvfp4":
            codes = torch.stack((weight & 0x0F, weight >> 4), dim=-1).flatten(-2)  # even column: low nibble
            values = E2M1_VALUES.to(weight.device)[codes.long()]  # (out, in)
            weight = _per_block(values, self.weight_scale.float()) * self.weight_scale_2.float()
        else:  # int4: rows 2i and 2i+1 in the low and high nibble, two's complement
            nibbles = torch.stack((weight & 0x0F, weight >> 4), dim=1).flatten(0, 1).to(torch.int8)
            values = (nibbles - 16 * (nibbles >= 8).to(torch.int8)).float()  # (out, in)
            weight = _per_block(values, self.weight_scale.float())
        if self.pre_quant_scale is not None:
            weight = weight * self.pre_quant_scale.float()  # the input is scaled by it before the matmul
        return weight

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize a layer input as the deployed kernel does, at the stored input scale."""
        scale = self.input_scale.float()
        h = x.float()
        if self.pre_quant_scale is not None:  # quantize x * s; the dequantized weight already holds s
            h = h * self.pre_quant_scale.float()
        if self.algo == "fp8":
            h = (h / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
        elif self.algo == "int8":
            h = (h / scale).round().clamp(-128, 127) * scale
        elif self.algo == "nvfp4":
            h = nvfp4_fake_quant(h, scale)
        if self.pre_quant_scale is not None:
            h = h / self.pre_quant_scale.float()
        return h.to(x.dtype)


def _per_block(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """values (out, in) * scale (out, in / block), each scale over `block` consecutive inputs of a row."""
    out, inp = values.shape
    return (values.view(out, scale.shape[1], -1) * scale[..., None]).view(out, inp)


def nvfp4_fake_quant(x: torch.Tensor, global_scale: torch.Tensor, block: int = 16) -> torch.Tensor:
    """NVFP4 quantize-dequantize of fp32 `x` along its last dim (a multiple of `block`): per block an E4M3
    scale amax / (6 * global_scale), values rounded to E2M1 (ties to even), as ModelOpt's NVFP4QTensor."""
    blocks = x.view(*x.shape[:-1], -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / (E2M1_MAX * global_scale)
    scale = scale.clamp(2**-9, E4M3_MAX).to(torch.float8_e4m3fn).float() * global_scale
    scaled = blocks / scale
    magnitude = scaled.abs()
    codes = torch.bucketize(magnitude, _E2M1_BOUNDS.to(x.device)) + torch.isin(magnitude, _E2M1_ROUND_UP.to(x.device))
    values = E2M1_VALUES.to(x.device)[codes] * scaled.sign()
    return (values * scale).view_as(x)


@dataclass
class QuantizedCheckpoint:
    """The quantized layers of a ModelOpt unified checkpoint: module name -> `QuantizedLinear`."""

    quant_algo: str
    layers: dict[str, QuantizedLinear] = field(default_factory=dict)

    @classmethod
    def read(
        cls, path: str | Path, config: HybridConfig | None = None, device: str | torch.device = "cpu"
    ) -> QuantizedCheckpoint | None:
        """The scales of a quantized checkpoint folder (None when config.json has no quantization_config)."""
        config = config or HybridConfig.from_file(path)
        quant_config = config.extra.get("quantization_config")
        if quant_config is None:
            return None
        method, algo = quant_config.get("quant_method"), quant_config.get("quant_algo")
        if method != "modelopt":
            raise CheckpointError(
                f"{path} is quantized by {method!r}: compressor reads ModelOpt exports (quant_method 'modelopt')"
            )
        if algo not in READABLE_ALGOS:
            raise CheckpointError(
                f"{path} is quantized as {algo}: compressor reads {', '.join(READABLE_ALGOS[:-1])} and mixes of them"
            )
        companions: dict[str, dict[str, torch.Tensor]] = {}  # module name -> {scale name: tensor}
        stored: dict[str, str] = {}  # module name -> safetensors dtype of its weight
        for file in sorted(set(weight_files(path).values())):
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    owner, _, suffix = name.rpartition(".")
                    if suffix in COMPANIONS:
                        companions.setdefault(owner, {})[suffix] = f.get_tensor(name)
                    elif suffix == "weight":
                        stored[owner] = f.get_slice(name).get_dtype()
        checkpoint = cls(quant_algo=algo)
        for owner, tensors in companions.items():
            if "weight_scale" not in tensors:
                continue  # KV-cache scales only
            if owner not in stored:
                raise CheckpointError(f"{path} has scales for {owner} but no {owner}.weight")
            checkpoint.layers[owner] = QuantizedLinear(
                algo=_layout(owner, stored[owner], tensors),
                weight_scale=tensors["weight_scale"],
                weight_scale_2=tensors.get("weight_scale_2"),
                input_scale=tensors.get("input_scale"),
                pre_quant_scale=tensors.get("pre_quant_scale"),
            )
        return checkpoint

    def is_companion(self, name: str) -> bool:
        """A scale read with its weight (or a KV-cache scale), not a parameter of its own."""
        return name.rpartition(".")[2] in COMPANIONS

    def layer(self, name: str) -> QuantizedLinear | None:
        """The quantized layer whose weight is the tensor `name`, if any."""
        owner, _, suffix = name.rpartition(".")
        return self.layers.get(owner) if suffix == "weight" else None


def _layout(owner: str, stored_dtype: str, tensors: dict[str, torch.Tensor]) -> str:
    """fp8 / nvfp4 / int8 / int4 from the stored weight's safetensors dtype and its scales."""
    scale_dtype = tensors["weight_scale"].dtype
    if stored_dtype == "F8_E4M3":
        return "fp8"
    if stored_dtype == "I8":
        return "int8"
    if stored_dtype == "U8" and scale_dtype == torch.float8_e4m3fn and "weight_scale_2" in tensors:
        return "nvfp4"
    if stored_dtype == "U8" and scale_dtype.is_floating_point and scale_dtype.itemsize > 1:
        return "int4"
    raise CheckpointError(
        f"{owner}.weight is stored as {stored_dtype} with a {scale_dtype} weight_scale: not a layout compressor "
        "reads (FP8, NVFP4, INT8 SmoothQuant, INT4 AWQ)"
    )
