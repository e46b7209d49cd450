"""The target of a pruning: which source blocks a pruned model keeps, in order, and the widths each keeps
(`BlockTarget`, `Target`). Strategies propose targets and `compressor.prune` slices a model to one; a target
is checked against its source config (`check_fits`), described, and turned into the pruned model's config,
all without weights (and without torch: the command line builds its options from the strategies that
import it).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from compressor.config import ATTENTION, KIND_CHARS, MAMBA, MLP, MOE, OVERRIDABLE, HybridConfig, loaders
from compressor.errors import CompressorError


@dataclass(frozen=True)
class BlockTarget:
    """One kept block: its index in the source model and the widths it keeps. A block carries only its own
    kind's widths (`OVERRIDABLE[kind]`): the other kinds' are 0 however it was built, so equal blocks compare
    equal and its JSON form (`to_dict`) names its kind's widths alone."""

    source: int
    kind: str
    intermediate_size: int = 0
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    n_routed_experts: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0

    def __post_init__(self) -> None:
        own = OVERRIDABLE.get(self.kind, ())
        for name in WIDTHS:
            if name not in own:
                object.__setattr__(self, name, 0)

    @property
    def widths(self) -> dict[str, int]:
        """Its kind's widths by name."""
        return {name: getattr(self, name) for name in OVERRIDABLE[self.kind]}

    def to_dict(self) -> dict:
        """The source index, the kind and that kind's widths."""
        return {"source": self.source, "kind": self.kind, **self.widths}


WIDTHS = tuple(f.name for f in dataclasses.fields(BlockTarget) if f.name not in ("source", "kind"))


@dataclass(frozen=True)
class Target:
    """A pruned architecture in terms of the source model."""

    hidden_size: int
    blocks: tuple[BlockTarget, ...]

    @classmethod
    def uniform(
        cls,
        source: HybridConfig,
        *,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        mamba_num_heads: int | None = None,
        mamba_head_dim: int | None = None,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        n_routed_experts: int | None = None,
        moe_intermediate_size: int | None = None,
        moe_shared_expert_intermediate_size: int | None = None,
        drop_blocks: tuple[int, ...] | list[int] = (),
    ) -> Target:
        """Every kept block of a kind gets the same widths (None keeps the block's own)."""
        wanted = {
            "intermediate_size": intermediate_size,
            "mamba_num_heads": mamba_num_heads,
            "mamba_head_dim": mamba_head_dim,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "n_routed_experts": n_routed_experts,
            "moe_intermediate_size": moe_intermediate_size,
            "moe_shared_expert_intermediate_size": moe_shared_expert_intermediate_size,
        }
        blocks = []
        for spec in source.blocks:
            if spec.index in drop_blocks:
                continue
            widths = {name: getattr(spec, name) if value is None else value for name, value in wanted.items()}
            blocks.append(BlockTarget(source=spec.index, kind=spec.kind, **widths))
        return cls(hidden_size=hidden_size or source.hidden_size, blocks=tuple(blocks))

    @classmethod
    def identity(cls, source: HybridConfig) -> Target:
        return cls.uniform(source)

    def config(self, source: HybridConfig) -> HybridConfig:
        """The pruned model's config: uniform fields from the most common width of each kind, per-block
        overrides for the rest (none when the target is uniform, so it writes the standard format)."""
        if not self.blocks:
            raise CompressorError("a pruned model needs at least one block")
        pattern = "".join(KIND_CHARS[b.kind] for b in self.blocks)
        fields = OVERRIDABLE
        uniform = {}
        for kind, names in fields.items():
            for name in names:
                values = [getattr(b, name) for b in self.blocks if b.kind == kind] or [getattr(source, name)]
                # the expert count is the largest (HybridConfig requires it), every other width the most common
                uniform[name] = max(values) if name == "n_routed_experts" else Counter(values).most_common(1)[0][0]
        overrides = {}
        for index, block in enumerate(self.blocks):
            differ = {n: getattr(block, n) for n in fields[block.kind] if getattr(block, n) != uniform[n]}
            if differ:
                overrides[index] = differ
        return source.replace(
            hybrid_override_pattern=pattern, hidden_size=self.hidden_size, block_overrides=overrides, **uniform
        )

    def to_dict(self) -> dict:
        """A JSON form (search results record their candidates with it)."""
        return {"hidden_size": self.hidden_size, "blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, raw: dict) -> Target:
        """Read `to_dict`'s form back (and the earlier one, which listed every kind's widths in every block)."""
        return cls(hidden_size=raw["hidden_size"], blocks=tuple(BlockTarget(**b) for b in raw["blocks"]))

    def check_fits(self, source: HybridConfig) -> None:
        """Refuse a target (one read back from a record) that is no pruning of `source`: the kept blocks are
        blocks of `source`, in order, each of its kind, and no width is above the source's or below 1."""
        if not 1 <= self.hidden_size <= source.hidden_size:
            raise CompressorError(f"target hidden_size {self.hidden_size} is not in 1..{source.hidden_size}")
        previous = -1
        for block in self.blocks:
            if not previous < block.source < source.num_blocks:
                raise CompressorError(
                    f"target block {block.source} is not a block of the source after {previous} "
                    f"(it has {source.num_blocks})"
                )
            spec = source.block(block.source)
            if block.kind != spec.kind:
                raise CompressorError(f"target block {block.source} is a {spec.kind} block, not {block.kind}")
            for name in OVERRIDABLE[block.kind]:
                if not 1 <= getattr(block, name) <= getattr(spec, name):
                    raise CompressorError(
                        f"target block {block.source}: {name} {getattr(block, name)} is not in 1..{getattr(spec, name)}"
                    )
            previous = block.source
        self.config(source)  # and the widths make a valid architecture (ConfigError)

    def describe(self, source: HybridConfig) -> str:
        """What the target changes, in a few words: 'hidden 192, ffn 576, mamba 12x20, experts 96, -1M, -1*';
        widths that vary from block to block are given as ranges ('ffn 384-576, mamba heads 8-12')."""
        config = self.config(source)
        parts = [f"hidden {config.hidden_size}"] if config.hidden_size != source.hidden_size else []
        moe = (
            ("n_routed_experts", "experts", MOE),
            ("moe_intermediate_size", "moe ffn", MOE),
            ("moe_shared_expert_intermediate_size", "shared ffn", MOE),
        )
        if config.is_uniform:
            if config.intermediate_size != source.intermediate_size:
                parts.append(f"ffn {config.intermediate_size}")
            if (config.mamba_num_heads, config.mamba_head_dim) != (source.mamba_num_heads, source.mamba_head_dim):
                parts.append(f"mamba {config.mamba_num_heads}x{config.mamba_head_dim}")
            parts += [f"{label} {getattr(config, name)}" for name, label, _ in moe
                      if config.has_moe and getattr(config, name) != getattr(source, name)]  # fmt: skip
        else:
            per_block = (("intermediate_size", "ffn", MLP), ("mamba_num_heads", "mamba heads", MAMBA), *moe)
            for name, label, kind in per_block:
                widths = sorted({getattr(b, name) for b in self.blocks if b.kind == kind})
                if widths and widths != [getattr(source, name)]:
                    parts.append(f"{label} {widths[0]}-{widths[-1]}" if len(widths) > 1 else f"{label} {widths[0]}")
        for kind, char in KIND_CHARS.items():
            removed = source.count(kind) - config.count(kind)
            if removed:
                parts.append(f"-{removed}{char}")
        return ", ".join(parts) or "unpruned"

    def summary(self, source: HybridConfig) -> dict:
        """What the target keeps, in the terms of ModelOpt's export_config where they apply, the blocks kept
        (indices in the source), whether the widths are uniform, the format its config.json is written in and the
        engines that run it. A width that differs from block to block is the list of its kind's kept blocks'
        widths, in order; the MoE widths appear only where the model has MoE blocks."""
        config = self.config(source)

        def width(name: str, kind: str) -> int | list[int]:
            widths = [getattr(b, name) for b in self.blocks if b.kind == kind]
            return widths if len(set(widths)) > 1 else getattr(config, name)

        moe = {}
        if config.has_moe:
            moe = {
                "num_moe_experts": width("n_routed_experts", MOE),
                "moe_ffn_hidden_size": width("moe_intermediate_size", MOE),
                "moe_shared_expert_intermediate_size": width("moe_shared_expert_intermediate_size", MOE),
            }
        return {
            "hidden_size": config.hidden_size,
            "ffn_hidden_size": width("intermediate_size", MLP),
            "num_attention_heads": width("num_attention_heads", ATTENTION),
            # not a ModelOpt key: it no longer prunes them
            "num_key_value_heads": width("num_key_value_heads", ATTENTION),
            "mamba_num_heads": width("mamba_num_heads", MAMBA),
            "mamba_head_dim": width("mamba_head_dim", MAMBA),
            **moe,
            "num_layers": config.num_blocks,
            "kept_blocks": [b.source for b in self.blocks],
            "uniform": config.is_uniform,
            "format": config.served_format,  # config.json's model_type
            "loads_in": loaders(config),  # the engines that run it as compressor does
        }
