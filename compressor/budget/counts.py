"""Parameter counts of a `HybridConfig`, exact and without building a model.

Parameters. `parameter_counts` has the keys of `HybridLM.parameter_counts()`: embeddings, lm_head, mamba,
attention, mlp, moe, norms (block norms + norm_f). Tied embeddings count once, under embeddings. Biases are
counted when `use_bias` (Mamba in/out projections), `mlp_bias` (MLP, shared expert, latent projections;
routed experts have none) or `use_conv_bias` ask for them. An MoE block holds its router (experts x hidden),
every routed expert, the shared expert and the latent projections; the router's e_score_correction_bias is
a buffer, not a parameter (as in transformers). `active_parameters` counts what one token uses: the same
minus the routed experts it is not routed to (num_experts_per_tok of each block's experts count), so the
router and the shared expert count in full; embeddings and lm_head included (Nemotron-3-Nano-30B-A3B:
3,580,073,408 of 31,577,937,344).
"""

from __future__ import annotations

from compressor.config import ATTENTION, MAMBA, MLP, MOE, BlockSpec, HybridConfig


def _block_groups(config: HybridConfig) -> list[tuple[BlockSpec, int]]:
    """Each distinct block with how many blocks share its widths: one per kind for the blocks without
    overrides, one per overridden block. Cheaper than `config.blocks` for the common uniform case."""
    groups: list[tuple[BlockSpec, int]] = []
    plain: dict[str, list[int]] = {}
    for index, kind in enumerate(config.block_kinds):
        if index in config.block_overrides:
            groups.append((config.block(index), 1))
        else:
            plain.setdefault(kind, []).append(index)
    groups.extend((config.block(indices[0]), len(indices)) for indices in plain.values())
    return groups


def _matrices(config: HybridConfig, spec: BlockSpec) -> list[tuple[int, int]]:
    """(out, in) of each weight matrix of a block's mixer, the tensors fp8 / fp4 quantize, but the routed
    experts' (`_expert_matrices`): for an MoE block, the shared expert and the latent projections."""
    h = config.hidden_size
    if spec.kind == MAMBA:
        inner, gn = spec.mamba_intermediate, config.n_groups * config.ssm_state_size
        return [(2 * inner + 2 * gn + spec.mamba_num_heads, h), (h, inner)]  # in_proj [z, xBC, dt], out_proj
    if spec.kind == ATTENTION:
        q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q)]  # q, k, v, o
    if spec.kind == MOE:
        shared, latent = spec.moe_shared_expert_intermediate_size, config.moe_latent_size
        projections = [(latent, h), (h, latent)] if latent is not None else []  # fc1 / fc2_latent_proj
        return [(shared, h), (h, shared), *projections]  # shared_experts up, down
    return [(spec.intermediate_size, h), (h, spec.intermediate_size)]  # up, down


def _expert_matrices(config: HybridConfig, spec: BlockSpec) -> list[tuple[int, int]]:
    """(out, in) of one routed expert's matrices (up, down; no biases) in an MoE block; none elsewhere."""
    if spec.kind != MOE:
        return []
    width = config.moe_latent_size or config.hidden_size
    return [(spec.moe_intermediate_size, width), (width, spec.moe_intermediate_size)]


def _expert_parameters(config: HybridConfig, spec: BlockSpec) -> int:
    return sum(o * i for o, i in _expert_matrices(config, spec))


def _router(config: HybridConfig, spec: BlockSpec) -> int:
    """Parameters of an MoE block's router (gate.weight, experts x hidden; kept in fp32); 0 elsewhere."""
    return spec.n_routed_experts * config.hidden_size if spec.kind == MOE else 0


def _vectors(config: HybridConfig, spec: BlockSpec) -> int:
    """Parameters of a block's mixer outside its weight matrices (conv, biases, A_log, D, dt_bias, norm)."""
    h = config.hidden_size
    if spec.kind == MAMBA:
        inner, heads = spec.mamba_intermediate, spec.mamba_num_heads
        conv_dim = inner + 2 * config.n_groups * config.ssm_state_size
        count = conv_dim * config.conv_kernel + 3 * heads + inner  # conv1d weight, A_log/D/dt_bias, gated norm
        count += conv_dim if config.use_conv_bias else 0
        count += (inner + conv_dim + heads) + h if config.use_bias else 0  # in_proj [z, xBC, dt], out_proj biases
        return count
    if spec.kind == MLP:
        return spec.intermediate_size + h if config.mlp_bias else 0
    if spec.kind == MOE and config.mlp_bias:  # shared expert (and latent projections) biases; experts have none
        latent = config.moe_latent_size
        return spec.moe_shared_expert_intermediate_size + h + (latent + h if latent is not None else 0)
    return 0  # nemotron_h attention has no biases


def _block_parameters(config: HybridConfig, spec: BlockSpec, experts: int | None = None) -> int:
    """Parameters of one block's mixer with `experts` of its routed experts (default: all of them)."""
    experts = spec.n_routed_experts if experts is None else experts
    matrices = sum(o * i for o, i in _matrices(config, spec))
    routed = experts * _expert_parameters(config, spec) + _router(config, spec)
    return matrices + routed + _vectors(config, spec)


def parameter_counts(config: HybridConfig) -> dict[str, int]:
    """Exact parameters by component, equal to `HybridLM(config).parameter_counts()`, without a model."""
    h, vocab = config.hidden_size, config.vocab_size
    counts = {"embeddings": vocab * h, "lm_head": 0 if config.tie_word_embeddings else vocab * h}
    counts.update(dict.fromkeys((MAMBA, ATTENTION, MLP, MOE), 0))
    for spec, count in _block_groups(config):
        counts[spec.kind] += count * _block_parameters(config, spec)
    counts["norms"] = h * (config.num_blocks + 1)
    return counts


def largest_block_parameters(config: HybridConfig) -> int:
    """Parameters of the largest block, its mixer and its norm: what a sharded model gathers at once."""
    return max(_block_parameters(config, spec) for spec, _ in _block_groups(config)) + config.hidden_size


def num_parameters(config: HybridConfig) -> int:
    """Total parameters (tied embeddings once)."""
    return sum(parameter_counts(config).values())


def active_parameters(config: HybridConfig) -> int:
    """Parameters one token uses: everything but the routed experts it is not routed to (num_experts_per_tok
    of each MoE block's experts count; the router and the shared expert always do). Embeddings and lm_head
    included; equal to `num_parameters` for a model without MoE blocks."""
    unused = sum(
        count * (spec.n_routed_experts - config.num_experts_per_tok) * _expert_parameters(config, spec)
        for spec, count in _block_groups(config)
        if spec.kind == MOE
    )
    return num_parameters(config) - unused


def experts_touched(experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts `tokens` tokens route to, each choosing `top_k` of `experts` uniformly and
    independently: experts x (1 - (1 - top_k / experts)^tokens) (the roofline's bytes-read convention)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)
