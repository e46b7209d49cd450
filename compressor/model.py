"""`HybridLM`: a Nemotron-H-format hybrid language model in plain PyTorch.

Parameter names equal the Hugging Face checkpoint's (`backbone.embeddings.weight`,
`backbone.layers.{i}.norm.weight`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`,
`lm_head.weight`), so a checkpoint's state dict loads without renaming. Each block is
`x = x + mixer(RMSNorm(x))` with one of four mixers:

- `MambaMixer` (M): Mamba-2 with grouped B/C, a chunked SSD scan for prefill/training and a recurrent
  step for decoding (pure torch in `compressor.ssd`, mamba-ssm kernels on CUDA when installed);
- `Attention` (*): grouped-query attention through `scaled_dot_product_attention`, no positional encoding;
  when `record_queries` holds query positions, a forward without a cache also keeps those queries' log
  attention weights in `recorded` (`log_attention`; attention transfer in distillation);
- `MLP` (-): down(relu(up(x))^2);
- `MoE` (E): a sigmoid top-k router over routed experts (each an MLP without biases) plus a shared expert,
  as transformers' `nemotron_h` computes it; the experts are stored one module per expert
  (`mixer.experts.{e}.up_proj.weight`), as NVIDIA's checkpoints store them.

The router runs in fp32, as in transformers: its logits are computed from the fp32-cast input and weight
(with autocast off), and `compressor.checkpoint.load_model` keeps the router's tensors (`FP32_TENSORS`) in
fp32 whatever the model's dtype, as transformers' `_keep_in_fp32_modules_strict` does. Expert outputs are
weighted and summed in fp32, then cast back to the input's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from compressor import kernels, ssd
from compressor.cache import HybridCache
from compressor.config import ATTENTION, MAMBA, MOE, BlockSpec, HybridConfig
from compressor.config import MLP as MLP_KIND  # the block kind; `MLP` below is its mixer

# Tensors kept in fp32 whatever the model's dtype (name suffixes): the MoE router's weight and score bias.
FP32_TENSORS = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Holds the weight of Mamba-2's grouped gated norm (`mixer.norm.weight`)."""

    def __init__(self, size: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.n_groups = n_groups
        self.eps = eps

    def forward(
        self, y: torch.Tensor, gate: torch.Tensor, norm: Callable[..., torch.Tensor] = ssd.gated_rms_norm
    ) -> torch.Tensor:
        """`norm` is the backend's gated_rms_norm (torch's by default)."""
        return norm(y, gate, self.weight, self.n_groups, self.eps)


class MambaMixer(nn.Module):
    """Mamba-2. Its five ops (conv, conv_update, chunk_scan, step, gated norm) come from one backend,
    `kernels.backend(...)`, chosen once per device and dtype: mamba-ssm / causal-conv1d kernels on CUDA where
    they take the layer, `compressor.ssd` otherwise; both keep the contract written in `compressor.ssd`."""

    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__()
        self.num_heads = spec.mamba_num_heads  # H
        self.head_dim = spec.mamba_head_dim  # P
        self.n_groups = config.n_groups  # G
        self.state_size = config.ssm_state_size  # N
        self.conv_kernel = config.conv_kernel  # K
        self.intermediate = spec.mamba_intermediate  # I = H * P
        self.conv_dim = self.intermediate + 2 * self.n_groups * self.state_size  # x, B, C
        self.chunk_size = config.chunk_size
        self.dt_limit = config.time_step_limit
        self.in_proj = nn.Linear(
            config.hidden_size, self.intermediate + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.intermediate, self.n_groups, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden: torch.Tensor, cache: HybridCache | None = None, index: int = 0) -> torch.Tensor:
        b, t, _ = hidden.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.state_size
        z, xbc, dt = self.in_proj(hidden).split([self.intermediate, self.conv_dim, H], dim=-1)
        ops = kernels.backend(xbc.device, xbc.dtype, self.conv_kernel)
        state = cache.layers[index] if cache is not None else None
        fresh = cache is None or cache.seen == 0
        weight = self.conv1d.weight.squeeze(1)  # (conv_dim, K)

        if fresh:
            if state is not None:  # what the next call continues from: the last K-1 inputs, not the prompt
                state.conv.copy_(ssd.conv_tail(xbc, self.conv_kernel - 1))
            xbc = ops.conv(xbc, weight, self.conv1d.bias)
        else:
            xbc = ops.conv_update(xbc, weight, self.conv1d.bias, state.conv)
        x, B, C = xbc.split([self.intermediate, G * N, G * N], dim=-1)
        x = x.reshape(b, t, H, P)
        B, C = B.reshape(b, t, G, N), C.reshape(b, t, G, N)
        A = -torch.exp(self.A_log.float())

        if state is not None and not fresh and t == 1:  # decoding: one recurrent step
            y = ops.step(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, self.dt_bias, self.dt_limit)
            y = y[:, None]
        else:
            initial = None if fresh else state.ssm
            y, final = ops.chunk_scan(x, dt, A, B, C, self.D, self.dt_bias, self.dt_limit, self.chunk_size, initial)
            if state is not None:
                state.ssm.copy_(final)
        y = self.norm(y.reshape(b, t, self.intermediate), z, ops.gated_rms_norm)
        return self.out_proj(y.to(hidden.dtype))


class Attention(nn.Module):
    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__()
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.record_queries: torch.Tensor | None = None  # query positions whose attention weights to keep
        self.recorded: torch.Tensor | None = None  # their log weights, (b, heads, queries, t)

    def forward(self, hidden: torch.Tensor, cache: HybridCache | None = None, index: int = 0) -> torch.Tensor:
        b, t, _ = hidden.shape
        q = self.q_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.record_queries is not None and cache is None:
            self.recorded = log_attention(q, k, self.record_queries)
        past = 0
        if cache is not None:
            past, state = cache.seen, cache.layers[index]
            state.key[:, :, past : past + t] = k
            state.value[:, :, past : past + t] = v
            k, v = state.key[:, :, : past + t], state.value[:, :, : past + t]
        mask = None
        if 1 < t < past + t:  # a prompt continuing a cached one: causal with an offset
            mask = torch.ones(t, past + t, dtype=torch.bool, device=hidden.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=past == 0 and t > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (b, heads, t, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def log_attention(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Causal log attention weights (b, heads, len(queries), t), in fp32, of the query positions `queries`
    (ascending) given q (b, heads, t, head_dim) and k (b, kv_heads, t, head_dim): what
    `scaled_dot_product_attention` weights the values with, for those rows only."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # each KV head serves `group` query heads
    scores = q[:, :, queries].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.arange(k.shape[2], device=q.device) > queries[:, None]  # (queries, t)
    return scores.masked_fill(future, float("-inf")).log_softmax(-1)


class FeedForward(nn.Module):
    """down(relu(up(x))^2): nemotron_h's MLP, shared expert and routed expert."""

    def __init__(self, width: int, ffn: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(width, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class MLP(FeedForward):
    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__(config.hidden_size, spec.intermediate_size, config.mlp_bias)


class TopKRouter(nn.Module):
    """`mixer.gate`: picks num_experts_per_tok experts per token and their weights.

    scores = sigmoid(x W^T) in fp32; the choice ranks scores + e_score_correction_bias (a buffer, set by
    auxiliary-loss-free load balancing during pretraining, never by gradients), within the topk_group best
    of n_group expert groups (a group ranks by the sum of its two best biased scores); the weights are the
    chosen experts' unbiased scores, normalised to sum to 1 (norm_topk_prob), times routed_scaling_factor.
    """

    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__()
        self.num_experts = spec.n_routed_experts  # E
        self.top_k = config.num_experts_per_tok  # k
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (n, hidden) -> (weights (n, k) fp32, expert indices (n, k))."""
        with torch.autocast(hidden.device.type, enabled=False):
            scores = F.linear(hidden.float(), self.weight.float()).sigmoid()  # (n, E)
        choice = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)  # (n, groups, E / groups)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (n, groups)
            best = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], -math.inf).flatten(1)
        experts = choice.topk(self.top_k, dim=-1).indices  # (n, k)
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, experts


class MoE(nn.Module):
    """Routed experts + a shared expert: out = fc2(sum_k w_k expert_k(fc1(x))) + shared_experts(x), with the
    router's k experts and weights per token; fc1 / fc2 are the latent projections (fc1_latent_proj /
    fc2_latent_proj, to and from moe_latent_size), identities without moe_latent_size.

    Dispatch groups the (token, expert) pairs by expert with one sort and runs each expert once on all its
    tokens: a Python loop over experts, none over tokens."""

    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__()
        h, latent = config.hidden_size, config.moe_latent_size
        self.width = latent or h  # d: where the experts work
        self.gate = TopKRouter(config, spec)
        self.experts = nn.ModuleList(
            FeedForward(self.width, spec.moe_intermediate_size, bias=False) for _ in range(spec.n_routed_experts)
        )
        self.shared_experts = FeedForward(h, spec.moe_shared_expert_intermediate_size, config.mlp_bias)
        if latent is not None:
            self.fc1_latent_proj = nn.Linear(h, latent, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(latent, h, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])  # (n, hidden)
        weights, experts = self.gate(x)  # (n, k)
        if self.fc1_latent_proj is not None:
            x = self.fc1_latent_proj(x)  # (n, d)
        routed = self.dispatch(x, weights, experts).to(hidden.dtype)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)
        return routed.view_as(hidden) + self.shared_experts(hidden)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_k weights[:, k] * expert_{experts[:, k]}(x), (n, d) in fp32."""
        n, k = experts.shape
        flat = experts.flatten()  # (n k,) pair p = token p // k, slot p % k
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        grouped = x[order // k].split(counts)  # each expert's tokens
        # every expert runs, on no tokens if none chose it, so each has a gradient (of zeros) in every process:
        # data-parallel gradient reduction (FSDP) needs the same tensors from all of them
        outputs = torch.cat([expert(t) for expert, t in zip(self.experts, grouped, strict=True)])
        position = torch.empty_like(order)
        position[order] = torch.arange(n * k, device=order.device)  # where each pair landed in `outputs`
        pairs = outputs[position].float().view(n, k, -1)  # back in pair order: (n, k, d)
        with torch.autocast(x.device.type, enabled=False):
            return torch.bmm(weights[:, None, :], pairs).squeeze(1)  # sum_k w_k out_k in fp32


MIXERS = {MAMBA: MambaMixer, ATTENTION: Attention, MLP_KIND: MLP, MOE: MoE}
# Mixers that keep decoding state: called with (hidden, cache, block index). MLP and MoE hold none and take the
# hidden states alone, as transformers' mixers do, so that wrappers written for those (ModelOpt's MoE
# quantization wrapper) call them as they are.
CACHED_KINDS = (MAMBA, ATTENTION)


class Block(nn.Module):
    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__()
        self.index = spec.index
        self.kind = spec.kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MIXERS[spec.kind](config, spec)

    def forward(self, hidden: torch.Tensor, cache: HybridCache | None = None) -> torch.Tensor:
        normed = self.norm(hidden.to(self.norm.weight.dtype))
        if self.kind in CACHED_KINDS:
            return hidden + self.mixer(normed, cache, self.index)
        return hidden + self.mixer(normed)


class Backbone(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        # nn.Embedding draws its weight as it is built. On the meta device the draw yields nothing and imports
        # torch._dynamo (about a second a process, paid by every load), so it is skipped there; elsewhere it is
        # kept, so that a seed gives the weights it gave.
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(config, spec) for spec in config.blocks)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        # activation checkpointing: keep only each block's input for backward and recompute the rest there
        self.checkpointing = False

    def forward(
        self, input_ids: torch.Tensor, cache: HybridCache | None = None, skip_blocks: Collection[int] = ()
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids)  # (b, t, hidden)
        if self.residual_in_fp32:
            hidden = hidden.float()
        recompute = self.checkpointing and torch.is_grad_enabled() and cache is None
        for block in self.layers:
            if block.index in skip_blocks:
                continue
            hidden = checkpoint(block, hidden, use_reentrant=False) if recompute else block(hidden, cache)
        return self.norm_f(hidden.to(self.norm_f.weight.dtype))


class HybridLM(nn.Module):
    """Nemotron-H-format causal LM. Built on the meta device it allocates nothing (for loading and counting)."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        if not self.lm_head.weight.is_meta:
            self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None = None,
        *,
        last_only: bool = False,
        head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        skip_blocks: Collection[int] = (),
    ) -> Any:
        """Logits (b, t, vocab) in the model's dtype; with `last_only`, only the last position's (b, 1, vocab).

        With a cache, the tokens continue the cached sequence and the cache advances past them. With
        `head`, returns head(final hidden states (b, t, hidden), lm_head weight) instead of logits: losses
        use it to form logits chunk by chunk, inside this forward so that sharded (FSDP) weights are
        gathered while they are used. `skip_blocks` (block indices) are passed over as if removed (their
        cache state stays untouched): drop-one scores without copying the model.
        """
        if cache is not None:
            cache.check_room(input_ids.shape[1])
        hidden = self.backbone(input_ids, cache, skip_blocks)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        if last_only:
            hidden = hidden[:, -1:]
        if head is not None:
            return head(hidden, self.lm_head.weight)
        return self.lm_head(hidden)

    def allocate_cache(self, batch_size: int, max_length: int, **kwargs) -> HybridCache:
        """An empty cache on the model's device and dtype (keyword overrides as in `HybridCache`)."""
        weight = self.lm_head.weight
        kwargs.setdefault("dtype", weight.dtype)
        kwargs.setdefault("device", weight.device)
        return HybridCache(self.config, batch_size, max_length, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by component: embeddings, lm_head, mamba, attention, mlp, moe, norms (block norms + norm_f).

        Tied embeddings count once, under embeddings; buffers (the router's e_score_correction_bias) are not
        parameters."""
        counts = dict.fromkeys(("embeddings", "lm_head", MAMBA, ATTENTION, MLP_KIND, MOE, "norms"), 0)
        for name, param in self.named_parameters():  # shared tensors are listed once
            if name.startswith("backbone.embeddings."):
                key = "embeddings"
            elif name.startswith("lm_head."):
                key = "lm_head"
            elif name.startswith("backbone.layers."):
                block = self.backbone.layers[int(name.split(".")[2])]
                key = "norms" if ".mixer." not in name else block.kind
            else:
                key = "norms"
            counts[key] += param.numel()
        return counts

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation following nemotron_h's scheme (normal linears, embeddings and routers, zero
        score-correction biases, S4D-real A, log-uniform dt, out_proj scaled by 1/sqrt(blocks))."""
        config = self.config
        std = config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv1d):
                bound = 1.0 / math.sqrt(module.weight.shape[-1])
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, TopKRouter):
                module.weight.normal_(0.0, std, generator=generator)
                module.e_score_correction_bias.zero_()
        for block in self.backbone.layers:
            mixer = block.mixer
            if isinstance(mixer, MambaMixer):
                heads = mixer.num_heads
                mixer.A_log.copy_(torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
                mixer.D.fill_(1.0)
                low, high = math.log(config.time_step_min), math.log(config.time_step_max)
                dt = torch.exp(torch.rand(heads, generator=generator) * (high - low) + low)
                dt = dt.clamp(min=config.time_step_floor)
                mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
                if config.rescale_prenorm_residual:
                    bound = 1.0 / math.sqrt(mixer.out_proj.weight.shape[1])  # kaiming_uniform(a=sqrt(5))
                    mixer.out_proj.weight.uniform_(-bound, bound, generator=generator)
                    mixer.out_proj.weight.div_(math.sqrt(config.num_blocks))


def tensor_shapes(config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of `config`'s model (its state dict's names, lm_head.weight also when tied) and its
    shape, without building the model: each distinct block is built once, on the meta device, so a model
    of many equal blocks costs a few. What a checkpoint's weights are checked against before loading."""
    hidden, vocab = config.hidden_size, config.vocab_size
    shapes = {"backbone.embeddings.weight": (vocab, hidden)}
    built: dict[BlockSpec, dict[str, tuple[int, ...]]] = {}  # by the block's widths (index 0)
    for spec in config.blocks:
        widths = dataclasses.replace(spec, index=0)
        if widths not in built:
            with torch.device("meta"):
                block = Block(config, widths)
            built[widths] = {name: tuple(tensor.shape) for name, tensor in block.state_dict().items()}
        shapes.update({f"backbone.layers.{spec.index}.{name}": shape for name, shape in built[widths].items()})
    return {**shapes, "backbone.norm_f.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
