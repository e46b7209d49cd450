"""Importance of every prunable axis, estimated from activations on calibration data.

Forward hooks reduce each activation as it passes (never storing it): first over the sequence of every
sample (mean |a| by default, or the L2 norm or max of |a|), then over samples (L2 by default, or mean or
max), in fp32. These defaults are Minitron's (ModelOpt). What is measured where:

- hidden (embedding) channels: the output of every block's pre-mixer RMSNorm and of norm_f; each hook
  is reduced on its own and the results are summed (ModelOpt sums over the norms it hooks);
- FFN neurons: the input of each MLP block's down_proj (after the squared ReLU);
- Mamba: a (heads, head_dim) statistic per block from the x part of in_proj's output (default, as in the
  Minitron papers) or from the SSM output entering out_proj (`mamba_signal="ssm_out"`). head_dim channels
  are ranked by the L2 norm over heads (one ranking shared by all heads); heads by the L2 norm over the
  kept channels, ranked within each of the n_groups groups, the same count kept in every group;
- attention: a (heads, head_dim) statistic from the input of o_proj; heads are ranked by its L2 norm over
  head_dim within their KV group, KV groups by the L2 norm of their heads;
- MoE experts: per expert, sums over calibration tokens of the router weight it receives (routing mass,
  the final top-k weights: normalised and scaled), of the tokens routed to it, and of the L2 norms of its
  outputs (`expert_norm` = that sum / its tokens, ModelOpt's expert score); experts are kept per routing
  group (the same number in each of the n_group groups), ranked by routing mass by default;
- MoE FFN neurons: per expert, the input of its down_proj over the tokens routed to it, each forward pass
  reduced like a sample (the tokens as its sequence); the shared expert's neurons like an MLP block's;
- blocks: block influence, 1 - cos(block input, block output) averaged over tokens; optionally the
  drop-one-block effect: how far the model's next-token distribution moves (KL to the full model) or how
  much its LM loss rises when the block alone is skipped. Each block's input is computed once per batch
  and only the blocks after it are rerun. With `iterative_rounds`, the least important block is removed
  and the rest are scored again, round by round; the removal order is kept.

Scores are written to an importance folder (`save` / `load`): `importance.safetensors` with the vectors and
`importance.json` with the model fingerprint, the data, the sample count, the sequence length and the
options. Pruning and strategies read it instead of recomputing; a folder made for another model (another
fingerprint) is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from compressor import distributed
from compressor.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from compressor.errors import CompressorError, OptionError
from compressor.losses import LossSpec, LossStats, TeacherLogits, head_loss, next_token_labels
from compressor.model import Attention, HybridLM, MambaMixer, MoE
from compressor.outputs import check_record, open_tensors, read_json, save_tensors, settle

if TYPE_CHECKING:
    from compressor.tasks import TaskScorer

SCORES_FILE = "importance.safetensors"
META_FILE = "importance.json"
SEQ_NORMS = {"mean": 1, "l2": 2, "max": float("inf")}
# Importance's per-block score tables, stored as `{name}.{block index}` in the scores file.
PER_BLOCK = ("ffn", "mamba", "attention", "expert_routing", "expert_tokens", "expert_norm", "expert_ffn", "shared_ffn")


@dataclass(frozen=True)
class ImportanceOptions:
    seq_reduce: Literal["mean", "l2", "max"] = "mean"
    batch_reduce: Literal["l2", "mean", "max"] = "l2"
    mamba_signal: Literal["x", "ssm_out"] = "x"
    drop_one: Literal["none", "kl", "loss", "retrieval"] = "none"
    iterative_rounds: int = 0

    def __post_init__(self) -> None:
        choices = {
            "seq_reduce": ("mean", "l2", "max"),
            "batch_reduce": ("l2", "mean", "max"),
            "mamba_signal": ("x", "ssm_out"),
            "drop_one": ("none", "kl", "loss", "retrieval"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise OptionError(name, f"{getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.iterative_rounds < 0:
            raise OptionError("iterative_rounds", f"must be at least 0, got {self.iterative_rounds}")
        if self.iterative_rounds and self.drop_one == "none":
            raise OptionError(
                "iterative_rounds", "re-scores with the drop-one effect: choose --drop-one kl, loss or retrieval"
            )


class _Statistic:
    """A running reduction of (batch, seq, channels) activations to (channels,); zeros when nothing passed
    (an expert no calibration token was routed to, a process with no batch of its own)."""

    def __init__(self, options: ImportanceOptions, size: int) -> None:
        self.size = size
        self.seq_norm = SEQ_NORMS[options.seq_reduce]
        self.batch_reduce = options.batch_reduce
        self.value: torch.Tensor | None = None
        self.samples = 0

    def add(self, activations: torch.Tensor) -> None:
        a = activations.detach().float()
        per_sample = torch.linalg.vector_norm(a, ord=self.seq_norm, dim=1)  # (batch, channels)
        if self.seq_norm == 1:
            per_sample = per_sample / a.shape[1]  # mean |a|
        if self.batch_reduce == "l2":
            part = per_sample.square().sum(0)
        elif self.batch_reduce == "mean":
            part = per_sample.sum(0)
        else:
            part = per_sample.amax(0)
        if self.value is None:
            self.value = part
        elif self.batch_reduce == "max":
            self.value = torch.maximum(self.value, part)
        else:
            self.value = self.value + part
        self.samples += a.shape[0]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """What it has reduced so far, as tensors named after `name` (`load_state` puts them back)."""
        state = {f"{name}.samples": torch.tensor(self.samples)}
        if self.value is not None:
            state[f"{name}.value"] = self.value
        return state

    def load_state(self, name: str, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.samples = int(state[f"{name}.samples"])
        value = state.get(f"{name}.value")
        self.value = None if value is None else value.to(device)

    def finish(self, world: distributed.World) -> torch.Tensor:
        value, samples = self.value, self.samples
        if value is None:
            value = torch.zeros(self.size, device=world.device)
        if world.distributed:
            import torch.distributed as dist

            dist.all_reduce(value, op=dist.ReduceOp.MAX if self.batch_reduce == "max" else dist.ReduceOp.SUM)
            samples = int(distributed.all_reduce_sum([samples], world)[0])
        if self.batch_reduce == "l2":
            return value.sqrt().cpu()
        if self.batch_reduce == "mean":
            return (value / max(samples, 1)).cpu()
        return value.cpu()


def _on_expert_input(stat: _Statistic) -> Callable:
    """A down_proj pre-hook of one routed expert: its forward pass's routed tokens (tokens, ffn) are one
    sample, the tokens its sequence; an expert no token chose runs on none and adds nothing."""

    def record(module, args):
        if len(args[0]):
            stat.add(args[0][None])

    return record


class _ExpertTraffic:
    """Per-expert sums over the calibration tokens of one MoE block: router weight received, tokens routed,
    L2 norms of the expert's outputs (float64)."""

    def __init__(self, experts: int, device: torch.device) -> None:
        self.mass = torch.zeros(experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(experts, dtype=torch.float64, device=device)
        self.norms = torch.zeros(experts, dtype=torch.float64, device=device)

    def add_routing(self, weights: torch.Tensor, experts: torch.Tensor) -> None:
        """The router's output: weights and expert indices, (tokens, k) each."""
        chosen = experts.flatten()
        self.mass.index_add_(0, chosen, weights.detach().flatten().double())
        self.tokens += torch.bincount(chosen, minlength=len(self.tokens))

    def add_output(self, expert: int, output: torch.Tensor) -> None:
        """One expert's outputs (its tokens, width), before the router weight."""
        self.norms[expert] += torch.linalg.vector_norm(output.detach().float(), dim=-1).sum().double()

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.{sums}": getattr(self, sums) for sums in ("mass", "tokens", "norms")}

    def load_state(self, name: str, state: dict[str, torch.Tensor], device: torch.device) -> None:
        for sums in ("mass", "tokens", "norms"):
            setattr(self, sums, state[f"{name}.{sums}"].to(device))

    def finish(self, world: distributed.World) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(routing mass, tokens, mean output norm per routed token), (experts,) each."""
        values = torch.stack([self.mass, self.tokens, self.norms])
        if world.distributed:
            summed = distributed.all_reduce_sum(values.flatten().tolist(), world)
            values = torch.tensor(summed, dtype=torch.float64).view(3, -1)
        mass, tokens, norms = values.cpu()
        return mass.float(), tokens.float(), (norms / tokens.clamp(min=1)).float()


@dataclass
class Importance:
    """Scores of every axis; higher is more important. Per-block entries are keyed by block index."""

    hidden: torch.Tensor  # (hidden,)
    ffn: dict[int, torch.Tensor]  # (ffn,) per MLP block
    mamba: dict[int, torch.Tensor]  # (heads, head_dim) per Mamba block
    attention: dict[int, torch.Tensor]  # (heads, head_dim) per attention block
    block_influence: torch.Tensor  # (blocks,)
    block_drop: torch.Tensor | None = None  # (blocks,) drop-one effect
    removal_order: list[int] | None = None  # iterative removal, least important first
    meta: dict[str, Any] = field(default_factory=dict)
    # MoE blocks (none in models without them)
    expert_routing: dict[int, torch.Tensor] = field(default_factory=dict)  # (experts,) router weight received
    expert_tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # (experts,) tokens routed to each
    expert_norm: dict[int, torch.Tensor] = field(default_factory=dict)  # (experts,) mean output L2 norm a token
    expert_ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # (experts, moe ffn) neurons of each
    shared_ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # (shared ffn,) shared expert's neurons

    # ----- rankings (what pruning keeps) ----------------------------------------------------------
    def keep_hidden(self, count: int) -> torch.Tensor:
        return _top(self.hidden, count)

    def keep_ffn(self, block: int, count: int) -> torch.Tensor:
        return _top(self.ffn[block], count)

    def mamba_head_dim_scores(self, block: int) -> torch.Tensor:
        """(head_dim,): one score per channel, shared by all heads (L2 over heads)."""
        return torch.linalg.vector_norm(self.mamba[block], dim=0)

    def keep_mamba(self, block: int, num_heads: int, head_dim: int, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept heads, kept head_dim channels), both sorted. Heads are chosen within each of the n_groups
        groups, num_heads / n_groups per group, by their norm over the kept channels."""
        stat = self.mamba[block]
        heads = stat.shape[0]
        if num_heads % n_groups:
            raise CompressorError(f"Mamba heads ({num_heads}) must be a multiple of n_groups ({n_groups})")
        channels = _top(self.mamba_head_dim_scores(block), head_dim)
        head_scores = torch.linalg.vector_norm(stat[:, channels], dim=1)
        return _top_per_group(head_scores, heads // n_groups, num_heads // n_groups), channels

    def attention_head_scores(self, block: int) -> torch.Tensor:
        return torch.linalg.vector_norm(self.attention[block], dim=1)

    def kv_group_scores(self, block: int, kv_heads: int) -> torch.Tensor:
        return torch.linalg.vector_norm(self.attention_head_scores(block).view(kv_heads, -1), dim=1)

    def keep_attention(
        self, block: int, num_heads: int, kv_heads: int, keep_kv: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept query heads, kept KV groups), sorted: the `keep_kv` best KV groups (all by default), then
        the same number of query heads in each, the best of each group."""
        keep_kv = kv_heads if keep_kv is None else keep_kv
        if num_heads % keep_kv:
            raise CompressorError(f"attention heads ({num_heads}) must be a multiple of KV heads ({keep_kv})")
        groups = _top(self.kv_group_scores(block, kv_heads), keep_kv)
        per_group = self.attention_head_scores(block).view(kv_heads, -1)
        group_size = per_group.shape[1]
        heads = [g * group_size + _top(per_group[g], num_heads // keep_kv) for g in groups.tolist()]
        return torch.cat(heads).sort().values, groups

    def expert_scores(self, block: int, method: Literal["routing", "norm"] = "routing") -> torch.Tensor:
        """(experts,) of an MoE block: routing mass (default) or mean output norm per routed token (ModelOpt's)."""
        table = {"routing": self.expert_routing, "norm": self.expert_norm}.get(method)
        if table is None:
            raise CompressorError(f"expert score {method!r} is not one of routing, norm")
        return self._moe_scores(table, block)

    def keep_experts(
        self, block: int, count: int, n_group: int = 1, method: Literal["routing", "norm"] = "routing"
    ) -> torch.Tensor:
        """Kept experts of an MoE block, sorted: count / n_group of each routing group (groups are contiguous
        runs of experts), the best by `expert_scores`."""
        scores = self.expert_scores(block, method)
        if count % n_group:
            raise CompressorError(f"routed experts ({count}) must be a multiple of n_group ({n_group})")
        return _top_per_group(scores, scores.numel() // n_group, count // n_group)

    def keep_expert_ffn(self, block: int, expert: int, count: int) -> torch.Tensor:
        """Kept FFN neurons of one routed expert (its own ranking)."""
        return _top(self._moe_scores(self.expert_ffn, block)[expert], count)

    def keep_shared_ffn(self, block: int, count: int) -> torch.Tensor:
        return _top(self._moe_scores(self.shared_ffn, block), count)

    def _moe_scores(self, table: dict[int, torch.Tensor], block: int) -> torch.Tensor:
        if block not in table:
            raise CompressorError(
                f"these scores have no MoE statistics for block {block}: recompute them with `compress importance`"
            )
        return table[block]

    @property
    def depth_method(self) -> str:
        """How blocks are ranked when nobody asks for a method: the drop-one effect when it was measured,
        else block influence."""
        return "drop" if self.block_drop is not None else "influence"

    def block_scores(self, method: str = "auto") -> torch.Tensor:
        """(blocks,) by `influence`, `drop` (iterative removal order when available: earlier removed =
        lower score) or `auto` (`depth_method`)."""
        if method == "auto":
            method = self.depth_method
        if method == "influence":
            return self.block_influence
        if self.block_drop is None:
            raise CompressorError("these scores have no drop-one-block effect: rerun importance with --drop-one kl")
        if self.removal_order:
            scores = self.block_drop.clone()
            floor = scores.min() - len(self.removal_order)
            for rank, block in enumerate(self.removal_order):
                scores[block] = floor + rank
            return scores
        return self.block_drop

    def tables(self) -> dict[str, torch.Tensor]:
        """Every score table by its name in the scores file (`flat_tables`)."""
        tables = {"hidden": self.hidden, "block_influence": self.block_influence, "block_drop": self.block_drop}
        return flat_tables({**tables, **{name: getattr(self, name) for name in PER_BLOCK}})

    def nonfinite(self) -> list[str]:
        """Names of the score tables holding NaN or infinity (scores to refuse)."""
        return [name for name, t in self.tables().items() if not torch.isfinite(t.float()).all()]

    # ----- files ------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        save_tensors({k: v.contiguous().float() for k, v in self.tables().items()}, folder / SCORES_FILE)
        meta = {**self.meta, "removal_order": self.removal_order}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(
        cls, folder: str | Path, fingerprint: str | None = None, *, config: HybridConfig | None = None
    ) -> Importance:
        """Read an importance folder as untrusted input; with `fingerprint`, refuse scores made for another
        model, and with `config`, scores whose tables do not have that model's shapes (`score_shapes`)."""
        folder = Path(folder)
        settle(folder)
        if not (folder / SCORES_FILE).exists() or not (folder / META_FILE).exists():
            raise CompressorError(f"{folder} is not an importance folder (no {SCORES_FILE} / {META_FILE})")
        meta = read_json(folder / META_FILE, "importance metadata")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise CompressorError(
                f"the scores in {folder} were computed for another model (fingerprint {meta.get('fingerprint')}, "
                f"this model's is {fingerprint}): recompute them with `compress importance`"
            )
        removal_order = meta.pop("removal_order", None)
        check_record(_Meta, {"removal_order": removal_order}, str(folder / META_FILE))
        with open_tensors(folder / SCORES_FILE, "importance scores") as f:
            names = list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
            _check_scores(folder, shapes, removal_order, config)  # before any tensor is read
            tables = nested_tables({name: f.get_tensor(name).float() for name in names})
        scores = cls(
            hidden=tables["hidden"],
            block_influence=tables["block_influence"],
            block_drop=tables.get("block_drop"),
            removal_order=removal_order,
            meta=meta,
            **{name: tables[name] for name in PER_BLOCK},
        )
        broken = scores.nonfinite()
        if broken:
            raise CompressorError(
                f"the scores in {folder} hold NaN or infinity ({', '.join(broken[:3])}): recompute them"
            )
        return scores


def flat_tables(tables: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Score tables by their names in a file: a per-block one (a dict by block index) as `{name}.{index}`
    each, the others as they are; None left out."""
    flat = {}
    for name, table in tables.items():
        if isinstance(table, dict):
            flat.update({f"{name}.{i}": t for i, t in table.items()})
        elif table is not None:
            flat[name] = table
    return flat


def nested_tables(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`flat_tables` undone: each of PER_BLOCK a dict by block index (empty where the file has none)."""
    tables: dict[str, Any] = {name: {} for name in PER_BLOCK}
    for key, table in flat.items():
        name, _, index = key.partition(".")
        if name in PER_BLOCK:
            tables[name][int(index)] = table
        else:
            tables[key] = table
    return tables


@dataclass
class _Meta:
    """What `Importance.load` reads of `importance.json` besides the fingerprint (kept as written)."""

    removal_order: list[int] | None


def score_shapes(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every score table an importance folder of a model with `config` may hold (the MoE
    tables, `block_drop` and `expert_*`, may be absent: `optional_scores`)."""
    shapes: dict[str, tuple[int, ...]] = {
        "hidden": (config.hidden_size,),
        "block_influence": (config.num_blocks,),
        "block_drop": (config.num_blocks,),
    }
    for spec in config.blocks:
        i = spec.index
        if spec.kind == MLP:
            shapes[f"ffn.{i}"] = (spec.intermediate_size,)
        elif spec.kind == MAMBA:
            shapes[f"mamba.{i}"] = (spec.mamba_num_heads, spec.mamba_head_dim)
        elif spec.kind == ATTENTION:
            shapes[f"attention.{i}"] = (spec.num_attention_heads, spec.head_dim)
        elif spec.kind == MOE:
            for name in ("expert_routing", "expert_tokens", "expert_norm"):
                shapes[f"{name}.{i}"] = (spec.n_routed_experts,)
            shapes[f"expert_ffn.{i}"] = (spec.n_routed_experts, spec.moe_intermediate_size)
            shapes[f"shared_ffn.{i}"] = (spec.moe_shared_expert_intermediate_size,)
    return shapes


def optional_scores(name: str) -> bool:
    """Whether a score table may be missing from an importance folder (measured only on request, or
    absent in folders written before MoE statistics were kept)."""
    return name == "block_drop" or name.partition(".")[0] in MOE_TABLES


MOE_TABLES = ("expert_routing", "expert_tokens", "expert_norm", "expert_ffn", "shared_ffn")


def scores_bytes(config: HybridConfig) -> int:
    """About how many bytes `Importance.save` writes for a model with `config` (fp32 tables, the header
    and the metadata): what `compress importance` checks the disk for before scoring."""
    shapes = score_shapes(config)
    return sum(4 * math.prod(shape) + 64 + len(name) for name, shape in shapes.items()) + 2**16


def _check_scores(
    folder: Path, shapes: dict[str, tuple[int, ...]], removal_order: list[int] | None, config: HybridConfig | None
) -> None:
    """Refuse score tables of unknown names, and with `config` any table missing or of another shape than
    the model's (scores of another model, or a damaged folder), and a removal order naming no block."""
    known = {"hidden", "block_influence", "block_drop"}
    for name in shapes:
        table, _, index = name.partition(".")
        if name not in known and not (table in PER_BLOCK and index.isdigit() and index.isascii()):
            raise CompressorError(f"{folder / SCORES_FILE} holds an unknown score table {name!r}: it is damaged")
    if config is None:
        return
    wanted = score_shapes(config)
    for name, shape in shapes.items():
        if name not in wanted or wanted[name] != shape:
            expected = f"shape {list(wanted[name])}" if name in wanted else "no such table"
            raise CompressorError(
                f"the scores in {folder} do not fit this model: {name} has shape {list(shape)}, the model needs "
                f"{expected} (scores of another model?): recompute them with `compress importance`"
            )
    missing = [name for name in wanted if name not in shapes and not optional_scores(name)]
    if missing:
        raise CompressorError(
            f"the scores in {folder} lack {', '.join(missing[:3])}: recompute them with `compress importance`"
        )
    if removal_order is not None and (
        len(set(removal_order)) != len(removal_order) or not all(0 <= b < config.num_blocks for b in removal_order)
    ):
        raise CompressorError(
            f"{folder / META_FILE}: removal_order must name distinct blocks of 0..{config.num_blocks - 1}"
        )


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in ascending index order (ties: lower index first)."""
    if not 0 < count <= scores.numel():
        raise CompressorError(f"cannot keep {count} of {scores.numel()} channels")
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count].sort().values


def _top_per_group(scores: torch.Tensor, group_size: int, count: int) -> torch.Tensor:
    groups = scores.view(-1, group_size)
    return torch.cat([g * group_size + _top(groups[g], count) for g in range(groups.shape[0])])


# ----- estimation ---------------------------------------------------------------------------------------
class _Collector:
    """Registers the hooks on a model and holds their running statistics."""

    def __init__(self, model: HybridLM, options: ImportanceOptions) -> None:
        self.options = options
        self.hidden: dict[str, _Statistic] = {}
        self.ffn: dict[int, _Statistic] = {}
        self.mamba: dict[int, tuple[_Statistic, int, int]] = {}
        self.attention: dict[int, tuple[_Statistic, int, int]] = {}
        self.traffic: dict[int, _ExpertTraffic] = {}
        self.expert_ffn: dict[int, list[_Statistic]] = {}
        self.shared_ffn: dict[int, _Statistic] = {}
        self.influence = torch.zeros(len(model.backbone.layers), dtype=torch.float64)
        self.tokens = 0
        self.handles = []
        hook = self.handles.append
        width = model.config.hidden_size
        for block in model.backbone.layers:
            i, mixer = block.index, block.mixer
            hook(block.norm.register_forward_hook(self._on_output(f"block.{i}", width)))
            hook(block.register_forward_hook(self._on_block(i)))
            if isinstance(mixer, MambaMixer):
                stat = _Statistic(options, mixer.intermediate)
                self.mamba[i] = (stat, mixer.num_heads, mixer.head_dim)
                if options.mamba_signal == "x":
                    width = mixer.intermediate  # in_proj output is [z, x, B, C, dt]; x follows z
                    hook(
                        mixer.in_proj.register_forward_hook(
                            lambda m, a, out, s=stat, w=width: s.add(out[..., w : 2 * w])
                        )
                    )
                else:
                    hook(mixer.out_proj.register_forward_pre_hook(lambda m, a, s=stat: s.add(a[0])))
            elif isinstance(mixer, Attention):
                stat = _Statistic(options, mixer.num_heads * mixer.head_dim)
                self.attention[i] = (stat, mixer.num_heads, mixer.head_dim)
                hook(mixer.o_proj.register_forward_pre_hook(lambda m, a, s=stat: s.add(a[0])))
            elif isinstance(mixer, MoE):
                self._hook_moe(i, mixer)
            else:
                stat = self.ffn[i] = _Statistic(options, mixer.down_proj.in_features)
                hook(mixer.down_proj.register_forward_pre_hook(lambda m, a, s=stat: s.add(a[0])))
        hook(model.backbone.norm_f.register_forward_hook(self._on_output("norm_f", width)))

    def _hook_moe(self, index: int, mixer: MoE) -> None:
        hook = self.handles.append
        traffic = self.traffic[index] = _ExpertTraffic(len(mixer.experts), mixer.gate.weight.device)
        hook(mixer.gate.register_forward_hook(lambda m, a, out, t=traffic: t.add_routing(*out)))
        stats = self.expert_ffn[index] = []
        for e, expert in enumerate(mixer.experts):
            stat = _Statistic(self.options, size=expert.down_proj.in_features)
            stats.append(stat)
            hook(expert.down_proj.register_forward_pre_hook(_on_expert_input(stat)))
            hook(expert.register_forward_hook(lambda m, a, out, t=traffic, e=e: t.add_output(e, out)))
        shared = self.shared_ffn[index] = _Statistic(self.options, mixer.shared_experts.down_proj.in_features)
        hook(mixer.shared_experts.down_proj.register_forward_pre_hook(lambda m, a, s=shared: s.add(a[0])))

    def _on_output(self, key: str, width: int) -> Callable:
        stat = self.hidden[key] = _Statistic(self.options, width)

        def record(module, args, output):
            stat.add(output)

        return record

    def _on_block(self, index: int) -> Callable:
        def record(module, args, output):
            cos = F.cosine_similarity(args[0].detach().float(), output.detach().float(), dim=-1)
            self.influence[index] += float((1 - cos).sum())
            if index == 0:
                self.tokens += cos.numel()

        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _sums(self) -> Iterator[tuple[str, _Statistic | _ExpertTraffic]]:
        """Every running reduction, by a name that is the same in every run on the same model."""
        yield from ((f"hidden.{key}", stat) for key, stat in self.hidden.items())
        yield from ((f"ffn.{i}", stat) for i, stat in self.ffn.items())
        yield from ((f"mamba.{i}", stat) for i, (stat, _, _) in self.mamba.items())
        yield from ((f"attention.{i}", stat) for i, (stat, _, _) in self.attention.items())
        yield from ((f"traffic.{i}", traffic) for i, traffic in self.traffic.items())
        for i, stats in self.expert_ffn.items():
            yield from ((f"expert_ffn.{i}.{e}", stat) for e, stat in enumerate(stats))
        yield from ((f"shared_ffn.{i}", stat) for i, stat in self.shared_ffn.items())

    def state(self) -> dict[str, torch.Tensor]:
        """Everything summed so far (this process's share), for `EstimateProgress`."""
        state = {"influence": self.influence, "tokens": torch.tensor(self.tokens)}
        for name, sums in self._sums():
            state.update(sums.state(name))
        return state

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.influence, self.tokens = state["influence"].clone(), int(state["tokens"])
        for name, sums in self._sums():
            sums.load_state(name, state, device)

    def finish(self, world: distributed.World) -> dict[str, Any]:
        hidden = sum(stat.finish(world) for stat in self.hidden.values())
        influence = self.influence.clone()
        tokens = self.tokens
        if world.distributed:
            *values, tokens = distributed.all_reduce_sum([*influence.tolist(), tokens], world)
            influence = torch.tensor(values, dtype=torch.float64)
        return {
            "hidden": hidden,
            "ffn": {i: s.finish(world) for i, s in self.ffn.items()},
            "mamba": {i: s.finish(world).view(h, p) for i, (s, h, p) in self.mamba.items()},
            "attention": {i: s.finish(world).view(h, d) for i, (s, h, d) in self.attention.items()},
            "block_influence": (influence / max(tokens, 1)).float(),
            **self._finish_moe(world),
        }

    def _finish_moe(self, world: distributed.World) -> dict[str, dict[int, torch.Tensor]]:
        out = {name: {} for name in ("expert_routing", "expert_tokens", "expert_norm", "expert_ffn", "shared_ffn")}
        for i, traffic in self.traffic.items():
            out["expert_routing"][i], out["expert_tokens"][i], out["expert_norm"][i] = traffic.finish(world)
            out["expert_ffn"][i] = torch.stack([s.finish(world) for s in self.expert_ffn[i]])
            out["shared_ffn"][i] = self.shared_ffn[i].finish(world)
        return out


@torch.no_grad()
def estimate(
    model: HybridLM,
    batches: Iterable[torch.Tensor | None],
    options: ImportanceOptions | None = None,
    *,
    world: distributed.World | None = None,
    meta: dict[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
    retrieval: TaskScorer | None = None,
    progress: EstimateProgress | None = None,
) -> Importance:
    """Score every axis of `model` on calibration batches (batch, seq_len) of token ids.

    `retrieval` is the probe of `drop_one="retrieval"`: a block's drop-one score is then how much the
    answers' log-likelihood falls without it (`compressor.tasks`).

    Under several processes (a model sharded across `world`, as `load_model(..., world=world)` makes it:
    blocks sharded, embeddings, norm_f and lm_head whole, which drop-one reads directly),
    give each its share of the batches from `distributed.share` (None: a padding pass): the statistics are
    summed over all, and every process returns the scores of all the batches.

    With `progress`, the estimate is saved every few batches and at each drop-one round, and one that
    was killed continues from its file, with the same batches, to the scores an uninterrupted one gives.
    """
    options = options or ImportanceOptions()
    world = world or distributed.World(device=model.lm_head.weight.device)
    if options.drop_one == "retrieval" and retrieval is None:
        raise OptionError("drop_one", "retrieval needs a retrieval task to measure the blocks on")
    batches = list(batches)
    model.eval()
    saved = progress.load() if progress is not None else None
    if saved is not None and on_batch is not None:
        on_batch(_tokens_done(batches, saved.position, options))  # what was counted before the kill
    if saved is None or saved.position.phase == 0:
        scores = _activation_pass(model, batches, options, world, on_batch, progress, saved)
        if progress is not None and options.drop_one != "none":
            progress.save(Position(phase=1), {}, _shared(scores, [], None))
    else:
        scores = _scores_of(saved.shared)
    drop, order = None, None
    if options.drop_one != "none":
        drop, order = _drop_one(model, batches, options, world, on_batch, retrieval, scores, progress, saved)
    return Importance(
        **scores,
        block_drop=drop,
        removal_order=order,
        meta={**(meta or {}), "options": asdict(options)},
    )


def _activation_pass(model, batches, options, world, on_batch, progress, saved) -> dict[str, Any]:
    """The statistics of every axis and the blocks' influence over the batches (from where `saved` was)."""
    collector = _Collector(model, options)
    start = 0
    if saved is not None:
        collector.load_state(saved.own, world.device)
        start = saved.position.batch
    every = _save_interval(batches)
    try:
        for index in range(start, len(batches)):
            ids = batches[index]
            if ids is None:  # a padding entry, only ever a share's last: its pass runs once the hooks are gone
                continue
            model.backbone(ids.to(world.device))
            if on_batch is not None:
                on_batch(ids.numel())
            if progress is not None and _due(index + 1, every, batches):
                progress.save(Position(batch=index + 1), collector.state(), {})
    finally:
        collector.close()
    for _ in range(batches.count(None)):
        distributed.idle_pass(model, world)
    return collector.finish(world)


def _drop_one(model, batches, options, world, on_batch, retrieval, scores, progress, saved):
    """Drop-one-block scores; with iterative rounds, the removal order as well."""
    blocks = model.backbone.layers
    removed: list[int] = []
    first, start = None, Position(phase=1)
    if saved is not None and saved.position.phase == 1:
        removed, first, start = saved.shared["drop.removed"].tolist(), saved.shared.get("drop.first"), saved.position
    for round_ in range(start.round, max(1, options.iterative_rounds)):
        if options.drop_one == "retrieval":
            round_scores = _retrieval_round(model, retrieval, set(removed))
        else:
            resumed = saved.own if round_ == start.round and start.batch else None
            save = None
            if progress is not None:
                shared = _shared(scores, removed, first)
                save = lambda batch, state, r=round_, shared=shared: progress.save(  # noqa: E731
                    Position(phase=1, round=r, batch=batch), state, shared
                )
            round_scores = _drop_one_round(model, batches, options.drop_one, set(removed), world, on_batch,
                                           start=start.batch if resumed else 0, state=resumed, save=save)  # fmt: skip
        if first is None:
            first = round_scores
        if not options.iterative_rounds:
            break
        candidates = [i for i in range(len(blocks)) if i not in removed]
        if len(candidates) <= 1:
            break
        removed.append(min(candidates, key=lambda i: round_scores[i]))
        if progress is not None:
            progress.save(Position(phase=1, round=round_ + 1), {}, _shared(scores, removed, first))
    return first, (removed or None)


def _retrieval_round(model: HybridLM, retrieval: TaskScorer, removed: set[int]) -> torch.Tensor:
    """Per block: how much the retrieval answers' log-likelihood falls when it is skipped as well as `removed`."""
    reference = retrieval(model, skip_blocks=removed)
    scores = torch.full((model.config.num_blocks,), float("nan"))
    for i in range(model.config.num_blocks):
        if i not in removed:
            scores[i] = reference - retrieval(model, skip_blocks=removed | {i})
    return scores


def _drop_one_round(
    model, batches, metric, removed: set[int], world, on_batch, *, start: int = 0, state=None, save=None
) -> torch.Tensor:
    """Per block: the mean KL(full || without this block) or mean LM loss without it, given `removed`
    blocks are already gone (the reference is the model without `removed`). From batch `start` on, with the
    sums `state` had there; `save(batch, state)` every few batches."""
    totals = torch.zeros(model.config.num_blocks, dtype=torch.float64) if state is None else state["totals"].clone()
    tokens = 0 if state is None else int(state["tokens"])
    every = _save_interval(batches)
    for index in range(start, len(batches)):
        batch = batches[index]
        tokens += _drop_one_batch(model, batch, metric, removed, totals, world)
        if batch is not None and on_batch is not None:
            on_batch(batch.numel())
        if save is not None and _due(index + 1, every, batches):
            save(index + 1, {"totals": totals, "tokens": torch.tensor(tokens)})
    *values, tokens = distributed.all_reduce_sum([*totals.tolist(), tokens], world)
    scores = torch.tensor(values, dtype=torch.float64) / max(tokens, 1)
    for i in removed:
        scores[i] = float("nan")
    return scores.float()


def _drop_one_batch(model, batch, metric, removed: set[int], totals: torch.Tensor, world) -> int:
    """One batch of a drop-one round: each block's KL or loss added to `totals`; returns the tokens they
    are means over (0 for a padding pass, None, which only takes part in the collectives)."""
    backbone = model.backbone
    blocks = backbone.layers
    spec = LossSpec()
    weight = model.lm_head.weight
    ids = (batch if batch is not None else distributed.IDLE_IDS).to(world.device)
    hidden = backbone.embeddings(ids)
    inputs = []
    for i, block in enumerate(blocks):
        inputs.append(hidden)
        if i not in removed:
            hidden = block(hidden)
    reference = backbone.norm_f(hidden).flatten(0, 1)
    labels = next_token_labels(ids)
    for i in range(len(blocks)):
        if i in removed:
            continue
        hidden = inputs[i]
        for j in range(i + 1, len(blocks)):
            if j not in removed:
                hidden = blocks[j](hidden)
        if batch is None:
            continue
        final = backbone.norm_f(hidden).flatten(0, 1)
        stats = LossStats()
        if metric == "kl":
            head_loss(final, weight, spec, teacher=TeacherLogits(reference, weight), stats=stats)
            totals[i] += float(stats.divergence)
        else:
            head_loss(final, weight, spec, labels=labels, stats=stats)
            totals[i] += float(stats.cross_entropy)
    if batch is None:
        return 0
    return ids.numel() if metric == "kl" else int((labels != -100).sum())


# ----- an estimate in progress ------------------------------------------------------------------------
PROGRESS_FILE = "progress.safetensors"
SAVES_PER_PASS = 20  # an estimate in progress is saved about every 5% of a pass over the batches


@dataclass(frozen=True)
class Position:
    """How far an estimate got: the activation pass (`phase` 0) or drop-one round `round` (phase 1), at
    `batch` of this process's share of the batches."""

    phase: int = 0
    round: int = 0
    batch: int = 0

    def describe(self) -> str:
        """'the activation pass after 12 batches', 'drop-one round 2 after 5 batches' (batches of a process)."""
        where = "the activation pass" if self.phase == 0 else f"drop-one round {self.round + 1}"
        return f"{where} after {self.batch} batch{'' if self.batch == 1 else 'es'}"


@dataclass
class Saved:
    """An estimate's progress read back: where it was, this process's running sums, and what every process
    holds alike (the activation pass's scores, the blocks drop-one removed, its first round's scores)."""

    position: Position
    own: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]


class EstimateProgress:
    """An estimate in progress, in one safetensors file that the main process writes for every process and
    replaces whole (a kill leaves the last one). `settings` (what is estimated: the model, the data, the
    options, the process count) must be the same to continue it."""

    def __init__(self, path: str | Path, world: distributed.World, settings: dict[str, Any]) -> None:
        self.path, self.world = Path(path), world
        self.settings = settings

    def load(self) -> Saved | None:
        """The progress saved at `path`, or None where there is none; another estimate's is refused."""
        if not self.path.exists():
            return None
        with open_tensors(self.path, "an importance estimate's progress") as f:
            settings, position = _saved_settings(self.path, f.metadata())
            changed = [key for key in self.settings if settings.get(key) != self.settings[key]]
            if changed:
                key = changed[0]
                raise CompressorError(
                    f"{self.path} holds an estimate with other settings ({key}: {settings.get(key)} then, "
                    f"{self.settings[key]} now): continue it with the same ones, or pass --overwrite to start again"
                )
            mine = f"rank{self.world.rank}."
            names = list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
            own = {name.removeprefix(mine): f.get_tensor(name) for name in names if name.startswith(mine)}
            shared = {name.removeprefix("shared."): f.get_tensor(name) for name in names if name.startswith("shared.")}
        return Saved(position, own, shared)

    def save(self, position: Position, own: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> None:
        """Every process's `own` sums and the main process's `shared` tensors at `position` (a collective:
        every process calls it at the same point)."""
        everyone = distributed.gather_objects({k: v.detach().cpu() for k, v in own.items()}, self.world)
        if not self.world.is_main:
            return
        tensors = {f"shared.{k}": v.detach().cpu().contiguous() for k, v in shared.items()}
        for rank, sums in enumerate(everyone):
            tensors.update({f"rank{rank}.{k}": v.clone().contiguous() for k, v in sums.items()})
        metadata = {"settings": json.dumps(self.settings), "position": json.dumps(asdict(position))}
        save_tensors(tensors, self.path, metadata=metadata)


def saved_position(path: str | Path) -> Position:
    """Where the estimate saved at `path` had got (its file's header only)."""
    with open_tensors(path, "an importance estimate's progress") as f:
        return _saved_settings(Path(path), f.metadata())[1]


def _saved_settings(path: Path, meta: dict[str, str] | None) -> tuple[dict[str, Any], Position]:
    try:
        return json.loads(meta["settings"]), Position(**json.loads(meta["position"]))
    except (KeyError, TypeError, ValueError):
        raise CompressorError(f"{path} is damaged: start again with --overwrite") from None


def _save_interval(batches: list) -> int:
    return max(1, len(batches) // SAVES_PER_PASS)


def _due(done: int, every: int, batches: list) -> bool:
    """Whether to save after `done` batches of a pass: every `every`, never after the last one (where a
    padding entry may be, and the pass ends anyway)."""
    return done % every == 0 and done < len(batches)


def _tokens_done(batches: list, position: Position, options: ImportanceOptions) -> int:
    """The tokens of this process's batches that an estimate saved at `position` had run (its progress)."""
    counted = lambda part: sum(ids.numel() for ids in part if ids is not None)  # noqa: E731
    if position.phase == 0:
        return counted(batches[: position.batch])
    rounds = position.round if options.drop_one in ("kl", "loss") else 0  # retrieval's rounds run no batches
    return counted(batches) * (1 + rounds) + counted(batches[: position.batch])


def _shared(scores: dict[str, Any], removed: list[int], first: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What every process holds alike once the activation pass is done, as named tensors."""
    shared = {"drop.removed": torch.tensor(removed, dtype=torch.long)}
    if first is not None:
        shared["drop.first"] = first
    return {**shared, **{f"scores.{name}": table for name, table in flat_tables(scores).items()}}


def _scores_of(shared: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The activation pass's scores back from `_shared`'s tensors."""
    return nested_tables({k.removeprefix("scores."): t for k, t in shared.items() if k.startswith("scores.")})
