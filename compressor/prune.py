"""Pruning: slice a model down to a target architecture, keeping the most important channels.

A `Target` names the source blocks to keep (in order) and the widths each keeps; `prune` slices every
tensor those widths touch, choosing what to keep from an `Importance`:

- hidden channels: embeddings, every block norm, every projection's input columns and output rows,
  norm_f, lm_head;
- FFN neurons: up_proj rows and down_proj columns of the block;
- Mamba heads (the same number kept in each of the n_groups groups) and head_dim channels (the same ones
  in every head): the rows of in_proj for z, x and dt, the x channels of conv1d, A_log, D, dt_bias, the
  gated-norm weight and out_proj's columns; B and C (shared by a group's heads) are untouched, so the
  gated norm's groups stay aligned;
- attention query heads within their KV groups (and whole KV groups when asked): q/k/v rows, o_proj columns;
- MoE routed experts (the same number kept in each of the n_group routing groups): the router's rows
  (gate.weight) and e_score_correction_bias entries, the kept experts' modules, renumbered in order;
- MoE expert FFN width (the same for every kept expert of a block, each keeping its own best neurons):
  each expert's up_proj rows and down_proj columns;
- MoE shared-expert FFN width: shared_experts up_proj rows (and bias) and down_proj columns;
- whole blocks: the pattern is rewritten.

Each kind's slicing is one function below; `pruned_tensors` yields the pruned model's tensors one at a
time, block by block. `prune` fills an empty model with them (an ordinary `HybridLM`, sharded across the
processes of a `world` when given: its source may be sharded too, each block is then gathered while it is
sliced); `write_pruned` writes them straight into a checkpoint without building the pruned model, so
memory holds the source and one tensor. Both save as standard checkpoints; uniform targets load in
transformers too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from compressor import distributed
from compressor.checkpoint import empty_model, materialize, write_checkpoint
from compressor.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from compressor.errors import CompressorError
from compressor.importance import Importance
from compressor.model import Block, HybridLM
from compressor.target import BlockTarget, Target


def prune(
    model: HybridLM, importance: Importance, target: Target, *, world: distributed.World | None = None
) -> HybridLM:
    """A new model with `target`'s architecture and the source's most important weights (copied), in the
    source's dtype; sharded across `world`'s processes when it has several (the frozen layout of
    `distributed.shard`: scoring and saving only run it forward)."""
    world = world or distributed.World(device=model.lm_head.weight.device)
    pruned = empty_model(target.config(model.config), model.backbone.embeddings.weight.dtype)
    distributed.shard(pruned, world, frozen=True)
    materialize(pruned, pruned_tensors(model, importance, target), world)
    return pruned.train(model.training)


def write_pruned(
    model: HybridLM,
    importance: Importance,
    target: Target,
    folder: Path,
    *,
    tokenizer_from: str | Path | None = None,
    world: distributed.World | None = None,
) -> HybridConfig:
    """Write the pruned model as a checkpoint into an existing (temporary) folder, tensor by tensor, without
    building it; returns its config. Under several processes (a sharded source) every process slices and
    the main one writes."""
    config = target.config(model.config)
    tensors = pruned_tensors(model, importance, target)
    if world is not None and not world.is_main:
        for _ in tensors:  # the collective gathers of a sharded source
            pass
        return config
    layout = empty_model(config, model.backbone.embeddings.weight.dtype).state_dict()
    write_checkpoint(folder, config, layout, tensors=tensors, tokenizer_from=tokenizer_from)
    return config


@torch.no_grad()
def pruned_tensors(model: HybridLM, importance: Importance, target: Target) -> Iterator[tuple[str, torch.Tensor]]:
    """The pruned model's tensors as (name, tensor), one at a time, each a new tensor: the embeddings, each
    kept block (gathered whole while it is sliced when the source is sharded), norm_f and lm_head."""
    source = model.config
    hidden = importance.keep_hidden(target.hidden_size)
    full = distributed.full  # the root's tensors, whole unless the source is sharded in the trained layout
    yield "backbone.embeddings.weight", full(model.backbone.embeddings.weight)[:, hidden]
    for new_index, block in enumerate(target.blocks):
        src = model.backbone.layers[block.source]
        if src.kind != block.kind:
            raise CompressorError(f"block {block.source} is a {src.kind} block, not {block.kind}")
        prefix = f"backbone.layers.{new_index}."
        slicer = {MAMBA: _slice_mamba, ATTENTION: _slice_attention, MLP: _slice_mlp, MOE: _slice_moe}[block.kind]
        with distributed.gathered(src):
            yield prefix + "norm.weight", src.norm.weight[hidden]
            for name, tensor in slicer(src.mixer, block, importance, hidden, source).items():
                yield prefix + "mixer." + name, tensor
    yield "backbone.norm_f.weight", full(model.backbone.norm_f.weight)[hidden]
    yield "lm_head.weight", full(model.lm_head.weight)[:, hidden]


@torch.no_grad()
def pruned_block(model: HybridLM, importance: Importance, block: BlockTarget, hidden_size: int) -> Block:
    """One block of a target built alone, as blockwise distillation trains it: source block `block.source`
    sliced to `block`'s widths and the `hidden_size` most important hidden channels (the slicing of
    `pruned_tensors`), in the source's dtype and on its device."""
    config = Target(hidden_size, (block,)).config(model.config)
    src = model.backbone.layers[block.source]
    if src.kind != block.kind:
        raise CompressorError(f"block {block.source} is a {src.kind} block, not {block.kind}")
    hidden = importance.keep_hidden(hidden_size)
    slicer = {MAMBA: _slice_mamba, ATTENTION: _slice_attention, MLP: _slice_mlp, MOE: _slice_moe}[block.kind]
    with distributed.gathered(src):
        state = {"norm.weight": src.norm.weight[hidden]}
        state |= {"mixer." + name: t for name, t in slicer(src.mixer, block, importance, hidden, model.config).items()}
    weight = src.norm.weight
    with torch.device("meta"):
        built = Block(config, config.blocks[0])
    built.load_state_dict({k: v.to(weight.device) for k, v in state.items()}, assign=True)
    built.index = block.source
    return built


def _slice_mlp(mixer, block: BlockTarget, importance: Importance, hidden: torch.Tensor, source) -> dict:
    return _slice_ffn(mixer, importance.keep_ffn(block.source, block.intermediate_size), hidden)


def _slice_ffn(ffn, neurons: torch.Tensor, hidden: torch.Tensor) -> dict:
    """A relu2 FFN (MLP block, shared or routed expert) keeping `neurons` and the `hidden` channels: up_proj
    rows (and bias) and columns, down_proj columns and rows (and bias)."""
    out = {
        "up_proj.weight": ffn.up_proj.weight[neurons][:, hidden],
        "down_proj.weight": ffn.down_proj.weight[hidden][:, neurons],
    }
    if ffn.up_proj.bias is not None:
        out["up_proj.bias"] = ffn.up_proj.bias[neurons]
        out["down_proj.bias"] = ffn.down_proj.bias[hidden]
    return out


def _slice_moe(mixer, block: BlockTarget, importance: Importance, hidden: torch.Tensor, source) -> dict:
    """An MoE block: its routed experts (`_drop_experts`), their FFN width (`_narrow_experts`), the shared
    expert's FFN width (shared_experts up_proj rows and bias, down_proj columns), and the hidden channels:
    gate.weight columns, shared_experts up_proj columns and down_proj rows (and bias), and either every kept
    expert's up_proj columns and down_proj rows or, with latent projections, fc1_latent_proj's columns and
    fc2_latent_proj's rows (and bias); the latent width itself is kept. A valid top-k and n_group
    divisibility are checked by the pruned config."""
    kept = importance.keep_experts(block.source, block.n_routed_experts, source.n_group)
    out = _drop_experts(mixer, kept, hidden)
    latent = mixer.fc1_latent_proj is not None
    expert_channels = torch.arange(mixer.width) if latent else hidden  # what the experts read and write
    out.update(_narrow_experts(mixer, block, importance, kept, expert_channels))
    shared = importance.keep_shared_ffn(block.source, block.moe_shared_expert_intermediate_size)
    out.update({f"shared_experts.{name}": t for name, t in _slice_ffn(mixer.shared_experts, shared, hidden).items()})
    if latent:
        out["fc1_latent_proj.weight"] = mixer.fc1_latent_proj.weight[:, hidden]
        out["fc2_latent_proj.weight"] = mixer.fc2_latent_proj.weight[hidden]
        if mixer.fc1_latent_proj.bias is not None:
            out["fc1_latent_proj.bias"] = mixer.fc1_latent_proj.bias.clone()
            out["fc2_latent_proj.bias"] = mixer.fc2_latent_proj.bias[hidden]
    return out


def _drop_experts(mixer, kept: torch.Tensor, hidden: torch.Tensor) -> dict:
    """Keep the routed experts `kept` (source indices, ascending; from `Importance.keep_experts`, the same
    number in each routing group): the router's rows of gate.weight (with the `hidden` columns) and entries
    of gate.e_score_correction_bias. The kept experts' own tensors move in `_narrow_experts`."""
    return {
        "gate.weight": mixer.gate.weight[kept][:, hidden],
        "gate.e_score_correction_bias": mixer.gate.e_score_correction_bias[kept],
    }


def _narrow_experts(mixer, block: BlockTarget, importance: Importance, kept: torch.Tensor, channels) -> dict:
    """The kept experts, renumbered 0.. in source order, each narrowed to moe_intermediate_size neurons of
    its own ranking (`Importance.keep_expert_ffn`): experts.{new}.up_proj rows and down_proj columns, and
    the `channels` they read and write (up_proj columns, down_proj rows)."""
    out = {}
    for new, old in enumerate(kept.tolist()):
        neurons = importance.keep_expert_ffn(block.source, old, block.moe_intermediate_size)
        for name, tensor in _slice_ffn(mixer.experts[old], neurons, channels).items():
            out[f"experts.{new}.{name}"] = tensor
    return out


def kept_attention_heads(importance: Importance, target: Target, source: HybridConfig) -> dict[str, list[int]]:
    """{source block index (as text): the query heads `prune` keeps} for each attention block of `target`
    whose heads are pruned, as `compression.json` records them (attention transfer pairs heads by it)."""
    kept = {}
    for block in target.blocks:
        spec = source.blocks[block.source]
        if block.kind == ATTENTION and block.num_attention_heads != spec.num_attention_heads:
            heads, _ = importance.keep_attention(
                block.source, block.num_attention_heads, spec.num_key_value_heads, keep_kv=block.num_key_value_heads
            )
            kept[str(block.source)] = heads.tolist()
    return kept


def _slice_attention(mixer, block: BlockTarget, importance: Importance, hidden: torch.Tensor, source) -> dict:
    heads, groups = importance.keep_attention(
        block.source, block.num_attention_heads, mixer.num_kv_heads, keep_kv=block.num_key_value_heads
    )
    d = mixer.head_dim
    q_rows = (heads[:, None] * d + torch.arange(d)).flatten()
    kv_rows = (groups[:, None] * d + torch.arange(d)).flatten()
    return {
        "q_proj.weight": mixer.q_proj.weight[q_rows][:, hidden],
        "k_proj.weight": mixer.k_proj.weight[kv_rows][:, hidden],
        "v_proj.weight": mixer.v_proj.weight[kv_rows][:, hidden],
        "o_proj.weight": mixer.o_proj.weight[hidden][:, q_rows],
    }


def _slice_mamba(mixer, block: BlockTarget, importance: Importance, hidden: torch.Tensor, source) -> dict:
    heads, channels = importance.keep_mamba(block.source, block.mamba_num_heads, block.mamba_head_dim, source.n_groups)
    inner, conv_dim = mixer.intermediate, mixer.conv_dim
    x = (heads[:, None] * mixer.head_dim + channels).flatten()  # kept rows of the (heads x head_dim) layout
    bc = torch.arange(inner, conv_dim)  # B and C channels of xBC, all kept
    # in_proj rows are [z (inner), x (inner), B, C (2GN), dt (heads)]
    in_rows = torch.cat([x, inner + x, inner + bc, inner + conv_dim + heads])
    conv_rows = torch.cat([x, bc])
    out = {
        "in_proj.weight": mixer.in_proj.weight[in_rows][:, hidden],
        "conv1d.weight": mixer.conv1d.weight[conv_rows],
        "dt_bias": mixer.dt_bias[heads],
        "A_log": mixer.A_log[heads],
        "D": mixer.D[heads],
        "norm.weight": mixer.norm.weight[x],
        "out_proj.weight": mixer.out_proj.weight[hidden][:, x],
    }
    if mixer.conv1d.bias is not None:
        out["conv1d.bias"] = mixer.conv1d.bias[conv_rows]
    if mixer.in_proj.bias is not None:
        out["in_proj.bias"] = mixer.in_proj.bias[in_rows]
        out["out_proj.bias"] = mixer.out_proj.bias[hidden]
    return out
