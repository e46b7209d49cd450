"""Memory plans before launch: what each of N processes (one a GPU) holds in a stage, from configs alone.

Every stage shards its models alike (`compressor.distributed.shard`: FSDP2, one unit per block; a frozen
model keeps embeddings, norm_f and lm_head whole on each process, a trained one shards them as its root
unit), so a plan is a sum of terms of three kinds:
- sharded: blocks' weights (all weights of a trained model), gradients and optimizer state, divided among
  the N processes, and a scorer's references, split with the held-out batches;
- gathered (N > 1 only): what FSDP holds whole beside the shard: the largest block while it runs (the
  all-gather buffer and the unsharded parameters, 2x the block) and a trained model's root unit;
- per process: a frozen model's embeddings, norm_f and lm_head, the activations of one micro-batch, a loss
  chunk's logits.

Stages:
- importance: the model; one forward's activations (the widest block's intermediates: a forward without
  gradients frees each block's tensors before the next, see `_block_activations`) plus the fp32 copy the
  statistics make of the widest hooked activation; with drop-one, every block's input for the micro-batch,
  the reference hidden states and a loss chunk;
- scoring (candidates of `compress prune` and `search`): the source as for importance, one candidate (its
  shard; its root and largest block gathered), the references (the source's final hidden states of this
  process's share of the held-out batches), one forward's activations, a loss chunk with the teacher's
  log-probs;
- distillation: the student's weights, gradients and AdamW's two moments in its dtype (sharded), the
  teacher's weights (frozen: none with a cached teacher), the student's root unit and largest
  block gathered, the activations autograd keeps for one micro-batch (`_block_activations` summed over the
  blocks; with activation checkpointing every block's input and the widest block's tensors), the loss
  chunk (logits, log-probs, gradient, and the teacher's probabilities, fp32).

A GPU plan adds `GPU_RESERVE` for the CUDA context and the allocator's slack. `MemoryPlan.smallest_nproc`
finds the fewest processes whose share fits a memory size. The weight terms are exact; the activation terms
are estimates of the pure-torch path, checked against peak memory measured on CPU by `benchmarks/scale.py
--plans`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from compressor.budget import GIB, GPUSpec, format_bytes, largest_block_parameters, parameter_counts
from compressor.config import ATTENTION, MAMBA, MOE, BlockSpec, HybridConfig
from compressor.distributed import World
from compressor.errors import CompressorError
from compressor.losses import LossSpec
from compressor.teacher_cache import bytes_per_token, slots_per_token

# CUDA context, NCCL buffers and the caching allocator's fragmentation: set aside on every GPU.
GPU_RESERVE = 2 * GIB
MAX_NPROC = 65536


@dataclass
class MemoryPlan:
    """Bytes one process holds in a stage, term by term, for any number of processes."""

    stage: str
    sharded: dict[str, int] = field(default_factory=dict)  # the whole run's, divided among the processes
    gathered: dict[str, int] = field(default_factory=dict)  # held whole by each process when N > 1
    each: dict[str, int] = field(default_factory=dict)  # held by each process whatever N
    notes: list[str] = field(default_factory=list)

    def terms(self, nproc: int) -> dict[str, int]:
        """Per process at `nproc` processes."""
        out = {name: -(-nbytes // nproc) for name, nbytes in self.sharded.items()}
        if nproc > 1:
            out.update(self.gathered)
        out.update(self.each)
        return out

    def total(self, nproc: int) -> int:
        return sum(self.terms(nproc).values())

    def smallest_nproc(self, memory: int) -> int | None:
        """The fewest processes whose per-process total fits in `memory` bytes (None: no number does)."""
        if self.total(1) <= memory:
            return 1
        low, high = 1, 2  # total(low) does not fit; grow high until it does, then bisect (totals fall with N)
        while self.total(high) > memory:
            low, high = high, 2 * high
            if high > MAX_NPROC:
                return None
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if self.total(middle) <= memory else (middle, high)
        return high

    def to_dict(self, nproc: int, memory: int | None = None) -> dict[str, Any]:
        out = {"stage": self.stage, "nproc": nproc, "terms": self.terms(nproc), "total": self.total(nproc)}
        if memory is not None:
            out.update(memory=memory, smallest_nproc=self.smallest_nproc(memory))
        return {**out, "notes": self.notes}


def plan_dtype(config: HybridConfig, dtype: str | None) -> torch.dtype:
    """The weights' dtype a stage runs in: `dtype`, else the checkpoint's, else bf16 (a preset)."""
    from compressor.checkpoint import parse_dtype

    return parse_dtype(dtype or config.extra.get("dtype") or config.extra.get("torch_dtype") or "bfloat16")


def device_memory(gpu: GPUSpec | None, device: torch.device | str = "cpu") -> int | None:
    """What a plan must fit in: the GPU's memory less `GPU_RESERVE`, else the local device's free memory."""
    if gpu is not None:
        return gpu.memory - GPU_RESERVE
    from compressor.budget import available_memory

    return available_memory(device)


def forward_plan(stage: str, config: HybridConfig, *, seq_len: int, batch_size: int, dtype: torch.dtype) -> MemoryPlan:
    """A stage that runs the model forward without gradients (a quantization's calibration): its weights and
    one forward's activations."""
    size = _size(dtype)
    plan = MemoryPlan(stage)
    _add_model(plan, "model", config, size)
    plan.each["activations (one forward)"] = _forward_bytes(config, batch_size * seq_len, size)
    return plan


def importance_plan(
    config: HybridConfig, *, seq_len: int, batch_size: int = 1, dtype: torch.dtype, drop_one: bool = False
) -> MemoryPlan:
    """`compress importance` (module docstring)."""
    size = _size(dtype)
    tokens = batch_size * seq_len
    plan = forward_plan("importance", config, seq_len=seq_len, batch_size=batch_size, dtype=dtype)
    plan.each["statistics (fp32 copy)"] = tokens * _widest_hooked(config) * 4
    if drop_one:
        stream = 4 if config.residual_in_fp32 else size
        plan.each["drop-one: block inputs"] = config.num_blocks * tokens * config.hidden_size * stream
        plan.each["drop-one: reference"] = tokens * config.hidden_size * size
        plan.each["loss chunk"] = _loss_chunk(config, tokens, copies=4)
    return plan


def scoring_plan(
    source: HybridConfig,
    candidate: HybridConfig,
    *,
    seq_len: int,
    batch_size: int = 1,
    batches: int,
    dtype: torch.dtype,
) -> MemoryPlan:
    """Scoring candidates on `batches` held-out batches (`ProxyScorer`): module docstring. The references
    are split among the processes with the batches."""
    size = _size(dtype)
    tokens = batch_size * seq_len
    plan = MemoryPlan("scoring")
    _add_model(plan, "source", source, size)
    _add_model(plan, "candidate", candidate, size)
    plan.sharded["references (held-out hidden states)"] = batches * tokens * source.hidden_size * size
    plan.each["activations (one forward)"] = _forward_bytes(source, tokens, size)
    plan.each["loss chunk"] = _loss_chunk(source, tokens, copies=4)
    return plan


def eval_plan(
    models: list[HybridConfig], teacher: HybridConfig | None, *, seq_len: int, batch_size: int, dtype: torch.dtype
) -> MemoryPlan:
    """`compress eval`'s loss mode: the first model and the largest other one (the first stays loaded while
    the others are evaluated), the teacher, one forward's activations (the widest of them) and a loss chunk
    (with the teacher's log-probs)."""
    size, tokens = _size(dtype), batch_size * seq_len
    plan = MemoryPlan("evaluation")
    _add_model(plan, "model", models[0], size)
    others = sorted(models[1:], key=lambda config: _sizes(config)[0])
    if others:
        _add_model(plan, "largest other model", others[-1], size)
    if teacher is not None:
        _add_model(plan, "teacher", teacher, size)
    forwards = [_forward_bytes(config, tokens, size) for config in [*models, *([teacher] if teacher else [])]]
    plan.each["activations (one forward)"] = max(forwards)
    plan.each["loss chunk"] = _loss_chunk(models[0], tokens, copies=4 if teacher is not None else 2)
    return plan


def check_plan_fits(
    plan: MemoryPlan,
    world: World,
    *,
    shape: str,
    levers: str,
    dry_run: bool = True,
    torchrun: bool = True,
) -> None:
    """Refuse (one CompressorError, on every process alike) a stage whose plan at the `world`'s processes
    needs more than the device's free memory (the least of any process's), before anything of that size is
    loaded or built: one line instead of an out-of-memory kill. `shape` says what the run's options make
    ("8 x 4,096 tokens a batch"), `levers` which options lower it; `dry_run`: the command has a --dry-run
    that shows the plan; `torchrun`: it shards across processes."""
    from compressor.budget import available_memory
    from compressor.distributed import gather_objects

    known = [free for free in gather_objects(available_memory(world.device), world) if free is not None]
    free, needed, device = (min(known) if known else None), plan.total(world.size), world.device
    if free is not None and needed > free:
        processes = plan.smallest_nproc(free) if torchrun else None
        more = f", or {processes} processes under torchrun" if processes is not None else ""
        raise CompressorError(
            f"{plan.stage} needs about {format_bytes(needed)} per process ({shape}), but {format_bytes(free)} is "
            f"free on {device}: use a smaller {levers}{more}{' (--dry-run shows the plan)' if dry_run else ''}"
        )


def library_plan(
    source: HybridConfig,
    *,
    tokens: int,
    seq_len: int,
    micro_batch_size: int,
    dtype: torch.dtype,
    stream: bool = False,
    epochs: int = 2,
) -> MemoryPlan:
    """`compress search --bld`: the source (its stored activations are written from a forward of it) and,
    while a variant trains, the widest block in fp32 with its gradients and AdamW's two moments, one
    micro-batch of its inputs and targets, and what autograd keeps through that one block. The parent
    activations go to disk (a note gives their size), one part of them in host memory at a time; with
    `stream` nothing goes to disk: one micro-batch of every block boundary is in memory, and each round of
    variants trained together fills half the memory left (a note gives the source passes)."""
    from compressor.bld import part_sequences, stored_itemsize

    size = _size(dtype)
    micro = micro_batch_size * seq_len
    itemsize = stored_itemsize(source.residual_in_fp32, dtype)
    plan = MemoryPlan("library (blockwise distillation)")
    _add_model(plan, "source", source, size)
    _, _, block = _sizes(source)
    plan.each["variant: weights, gradients, AdamW (fp32)"] = 16 * block
    plan.each["variant: inputs and targets (one micro-batch)"] = 2 * micro * source.hidden_size * 4
    widest = max(b + f for b, f in (_block_activations(source, s) for s in source.blocks))
    plan.each["variant: activations (one block)"] = micro * widest * 4
    plan.each["source: activations (one forward)"] = _forward_bytes(source, micro, size)
    boundaries = source.hidden_size * (source.num_blocks + 1) * itemsize
    if stream:
        plan.each["source: every block boundary (one micro-batch)"] = micro * boundaries
        plan.notes.append(
            f"streamed: no activations on disk; each round trains as many variants together as fit in half the "
            f"free memory (20 bytes a parameter each, about {format_bytes(20 * block)} for the widest block) "
            f"and runs {1 + 2 * epochs} passes of the source over {tokens:,} tokens"
        )
        return plan
    part = part_sequences(seq_len, source.hidden_size, source.num_blocks, itemsize) * seq_len * boundaries
    plan.notes.append(
        f"parent activations on disk: {format_bytes(tokens * boundaries)} for {tokens:,} tokens (every block "
        f"boundary, {itemsize} bytes a value); host memory holds one part of {format_bytes(part)} at a time; "
        "--bld-stream stores none"
    )
    return plan


def distill_plan(
    student: HybridConfig,
    teacher: HybridConfig | None,
    *,
    seq_len: int,
    micro_batch_size: int,
    dtype: torch.dtype,
    teacher_dtype: torch.dtype,
    autocast: bool,
    cache_teacher: bool = False,
    checkpointing: bool = False,
    loss: LossSpec | None = None,
    attention_queries: int = 0,
) -> MemoryPlan:
    """One step of `compress distill` / `train` (module docstring); `teacher` None is plain LM training;
    `attention_queries` > 0: with attention transfer over that many query positions."""
    size = _size(dtype)
    params, root, block = _sizes(student)
    plan = MemoryPlan("distillation" if teacher is not None else "training")
    plan.sharded["student weights"] = params * size
    plan.sharded["gradients"] = params * size
    plan.sharded["optimizer state (AdamW)"] = 2 * params * size
    plan.gathered["student root and largest block (gathered)"] = (root + 2 * block) * size
    if teacher is not None and not cache_teacher:
        _add_model(plan, "teacher", teacher, _size(teacher_dtype))
    tokens = micro_batch_size * seq_len
    act = 2 if autocast else size
    if checkpointing:
        plan.each["activations (block inputs + one block)"] = _checkpointed_activations(student, tokens, act)
    else:
        plan.each["activations (one micro-batch)"] = _training_activations(student, tokens, act)
    rows = min((loss or LossSpec()).rows_per_chunk(student.vocab_size), tokens)
    copies = 3 + (1 if teacher is not None else 0)  # logits, log-probs, gradient (+ teacher probabilities)
    plan.each["loss chunk"] = rows * student.vocab_size * 4 * copies
    if attention_queries and teacher is not None:
        # fp32 maps per attention block: the teacher's, the student's scores, log-softmax and its gradient
        heads = sum(spec.num_attention_heads for spec in student.blocks if spec.kind == ATTENTION)
        maps = micro_batch_size * heads * min(attention_queries, seq_len) * seq_len * 4
        plan.each["attention maps (--attention-loss)"] = 4 * maps
    return plan


def training_plan(
    config, student: HybridConfig, teacher: HybridConfig | None, device: torch.device | str
) -> MemoryPlan:
    """`distill_plan` for a run's options (a `compressor.train.TrainConfig`) on a `device` type: on CUDA the
    teacher defaults to bf16 and autocast to bf16, as the run would have them."""
    from compressor.checkpoint import parse_dtype

    device = torch.device(device)
    autocast = config.autocast == "bf16" or (config.autocast == "auto" and device.type == "cuda")
    plan = distill_plan(
        student,
        teacher if config.teacher is not None else None,
        seq_len=config.seq_len,
        micro_batch_size=config.micro_batch_size,
        dtype=parse_dtype(config.dtype),
        teacher_dtype=parse_dtype(config.resolved_teacher_dtype(device)),
        autocast=autocast,
        cache_teacher=config.cache_teacher,
        checkpointing=config.activation_checkpointing,
        loss=config.loss,
        attention_queries=config.attention_queries if config.attention_loss > 0 else 0,
    )
    if config.cache_teacher and teacher is not None:
        plan.notes.append(_teacher_cache_note(config, teacher.vocab_size))
    return plan


def _teacher_cache_note(config, vocab_size: int) -> str:
    """The disk a run's teacher cache takes: the training tokens it will read (all of a split it passes an
    epoch of), and the validation split's."""
    targets = config.teacher_targets
    slots = slots_per_token(config.top_k, vocab_size, targets)
    per_token = bytes_per_token(slots, targets)
    tokens = config.steps * config.batch_size * config.seq_len if config.steps else config.tokens
    what = f"{per_token} bytes a token ({targets}, {slots} slots)"
    if tokens:
        what = f"at most {format_bytes(tokens * per_token)} for {tokens:,} training tokens at {what}"
    else:
        what = f"{what} of one epoch of the training split"
    return f"teacher cache on disk: {what}, plus the validation split's; the teacher is in memory only to write it"


# ----- terms ----------------------------------------------------------------------------------------------
def _add_model(plan: MemoryPlan, label: str, config: HybridConfig, size: int) -> None:
    """A frozen model's weights: its blocks' shard, its embeddings, norm_f and lm_head whole, and when
    sharded its largest block gathered."""
    params, root, block = _sizes(config)
    plan.sharded[f"{label} weights (blocks)"] = (params - root) * size
    plan.each[f"{label} weights (embeddings, norm_f, lm_head)"] = root * size
    plan.gathered[f"{label} largest block (gathered)"] = 2 * block * size


def _sizes(config: HybridConfig) -> tuple[int, int, int]:
    """(parameters, parameters of the root unit: embeddings, lm_head and norm_f, parameters of the largest
    block)."""
    counts = parameter_counts(config)
    root = counts["embeddings"] + counts["lm_head"] + config.hidden_size
    return sum(counts.values()), root, largest_block_parameters(config)


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _block_activations(config: HybridConfig, spec: BlockSpec) -> tuple[int, int]:
    """(elements in the compute dtype, fp32 elements) one block holds per token of a forward that keeps its
    tensors for backward: its input and normed input (and the norm's fp32 normalized input), and per mixer
    what it computes on the way."""
    gn = config.n_groups * config.ssm_state_size
    h = config.hidden_size
    per_token, fp32 = 2 * h, h
    if spec.kind == MAMBA:
        inner, heads = spec.mamba_intermediate, spec.mamba_num_heads
        per_token += (2 * inner + 2 * gn + heads) + 2 * (inner + 2 * gn) + inner  # in_proj, conv, out_proj in
        # the scan works in fp32: x*dt, B, C, within-chunk decays and scores, output, gated norm
        fp32 += 2 * inner + 2 * gn + 2 * heads * config.chunk_size + 4 * inner
    elif spec.kind == ATTENTION:
        q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
        per_token += 3 * q + 2 * kv
    elif spec.kind == MOE:
        k, width = config.num_experts_per_tok, config.moe_latent_size or h
        # per routed pair: the expert's gathered input, its up_proj output after relu and squared; the shared
        # expert's two; the latent sum entering fc2_latent_proj
        per_token += k * (width + 2 * spec.moe_intermediate_size) + 2 * spec.moe_shared_expert_intermediate_size
        per_token += config.moe_latent_size or 0
        # router scores, top-k weights, each pair's weighted output (summed in fp32); the three int64 routing
        # index tensors of k per token, counted as two fp32 elements each
        fp32 += spec.n_routed_experts + k + k * width + 2 * 3 * k
    else:
        per_token += 3 * spec.intermediate_size
    return per_token, fp32


def _training_activations(config: HybridConfig, tokens: int, size: int) -> int:
    """What autograd keeps over all blocks for one micro-batch of `tokens` (plus embeddings and norm_f, whose
    normalized input is fp32)."""
    per_token, fp32 = 2 * config.hidden_size, config.hidden_size
    for spec in config.blocks:
        block, block_fp32 = _block_activations(config, spec)
        per_token, fp32 = per_token + block, fp32 + block_fp32
    return tokens * (per_token * size + fp32 * 4)


def _checkpointed_activations(config: HybridConfig, tokens: int, size: int) -> int:
    """With activation checkpointing: every block's input (the residual stream), and the widest block's
    tensors while it is recomputed and differentiated."""
    stream = 4 if config.residual_in_fp32 else size
    widest = max(block * size + fp32 * 4 for block, fp32 in (_block_activations(config, s) for s in config.blocks))
    return tokens * ((config.num_blocks + 2) * config.hidden_size * stream + widest)


def _forward_bytes(config: HybridConfig, tokens: int, size: int) -> int:
    """The peak of a forward without gradients: the residual stream (fp32 when `residual_in_fp32`) and the
    widest block's intermediates (each block's are freed before the next)."""
    stream = tokens * config.hidden_size * (4 if config.residual_in_fp32 else size)
    widest = max(block * size + fp32 * 4 for block, fp32 in (_block_activations(config, s) for s in config.blocks))
    return 2 * stream + tokens * widest


def _widest_hooked(config: HybridConfig) -> int:
    """The widest activation importance reduces (channels): hidden, a Mamba block's x, attention heads, FFN."""
    widths = [config.hidden_size]
    for spec in config.blocks:
        if spec.kind == MAMBA:
            widths.append(spec.mamba_intermediate)
        elif spec.kind == ATTENTION:
            widths.append(spec.num_attention_heads * spec.head_dim)
        elif spec.kind == MOE:
            widths.append(max(spec.moe_intermediate_size, spec.moe_shared_expert_intermediate_size))
        else:
            widths.append(spec.intermediate_size)
    return max(widths)


def _loss_chunk(config: HybridConfig, tokens: int, copies: int) -> int:
    """fp32 logits of one chunk of rows through the head, `copies` of them alive at once."""
    return min(LossSpec().rows_per_chunk(config.vocab_size), tokens) * config.vocab_size * 4 * copies


def describe(plan: MemoryPlan, nproc: int, memory: int | None, device: str) -> list[str]:
    """The verdict lines under a plan's table: whether it fits at `nproc`, and the fewest processes that fit."""
    total = plan.total(nproc)
    lines = []
    if memory is not None:
        spare = memory - total
        verdict = "fits" if spare >= 0 else "does not fit"
        lines.append(
            f"{verdict} on {device} at {nproc} process{'es' if nproc > 1 else ''}: {format_bytes(memory)} "
            f"usable, {format_bytes(abs(spare))} {'to spare' if spare >= 0 else 'short'}"
        )
        smallest = plan.smallest_nproc(memory)
        lines.append(
            f"smallest number of {device} that fits: {smallest}"
            if smallest is not None
            else f"no number of {device} fits: the per-process terms alone need {format_bytes(plan.total(MAX_NPROC))}"
        )
    return lines
