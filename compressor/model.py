"""`HybridLM`: a Nemotron-H-format hybrid language model in plain PyTorch.

Parameter names equal the Hugging Face checkpoint's (`backbone.embeddings.weight`,
`backbone.layers.{i}.norm.weight`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`,
`lm_head.weight`), so a checkpoint's state dict loads without renaming. Each block is
`x = x + mixer(RMSNorm(x))` with one of three mixers:

- `MambaMixer` (M): Mamba-2 with grouped B/C, a chunked SSD scan for prefill/training and a recurrent
  step for decoding (pure torch in `compressor.ssd`, mamba-ssm kernels on CUDA when installed);
- `Attention` (*): grouped-query attention through `scaled_dot_product_attention`, no positional encoding;
- `MLP` (-): down(relu(up(x))^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor import kernels, ssd
from compressor.cache import HybridCache
from compressor.config import ATTENTION, MAMBA, BlockSpec, HybridConfig


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

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if kernels.available(y.device):
            return kernels.gated_rms_norm(y, gate, self.weight, self.n_groups, self.eps)
        return ssd.gated_rms_norm(y, gate, self.weight, self.n_groups, self.eps)


class MambaMixer(nn.Module):
    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__()
        self.num_heads = spec.mamba_num_heads  # H
        self.head_dim = spec.mamba_head_dim  # P
        self.n_groups = config.n_groups  # G
        self.state_size = config.ssm_state_size  # N
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
        state = cache.layers[index] if cache is not None else None
        fresh = cache is None or cache.seen == 0
        fast = kernels.available(hidden.device)
        weight = self.conv1d.weight.squeeze(1)  # (conv_dim, K)

        if fast and fresh:
            width = self.conv1d.kernel_size[0] - 1
            if state is not None and width:  # the last K-1 inputs, zero-padded on the left for short prompts
                state.conv.copy_(F.pad(xbc.transpose(1, 2), (width, 0))[..., -width:])
            xbc = kernels.conv(xbc, weight, self.conv1d.bias)
        else:
            xbc, conv_state = ssd.causal_conv1d(xbc, weight, self.conv1d.bias, None if fresh else state.conv)
            if state is not None:
                state.conv.copy_(conv_state)
        x, B, C = xbc.split([self.intermediate, G * N, G * N], dim=-1)
        x = x.reshape(b, t, H, P)
        B, C = B.reshape(b, t, G, N), C.reshape(b, t, G, N)
        A = -torch.exp(self.A_log.float())

        if state is not None and not fresh and t == 1:  # decoding: one recurrent step
            if fast:
                y = kernels.step(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, self.dt_bias)
                y = y[:, None]
            else:
                step_dt = self._discretize(dt[:, 0])
                new_state, y = ssd.ssd_step(state.ssm, x[:, 0], step_dt, A, B[:, 0], C[:, 0])
                state.ssm.copy_(new_state)
                y = y[:, None] + self.D.float()[:, None] * x.float()
        else:
            initial = None if fresh else state.ssm
            if fast:
                y, final = kernels.chunk_scan(
                    x, dt, A, B, C, self.D, self.dt_bias, self.dt_limit, self.chunk_size, initial
                )
            else:
                y, final = ssd.ssd_chunked(x, self._discretize(dt), A, B, C, self.chunk_size, initial)
                y = y + self.D.float()[:, None] * x.float()
            if state is not None:
                state.ssm.copy_(final)
        y = self.norm(y.reshape(b, t, self.intermediate), z)
        return self.out_proj(y.to(hidden.dtype))

    def _discretize(self, dt: torch.Tensor) -> torch.Tensor:
        """dt = clamp(softplus(dt + dt_bias)) in fp32."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        low, high = self.dt_limit
        return dt if (low, high) == (0.0, math.inf) else dt.clamp(low, high)


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

    def forward(self, hidden: torch.Tensor, cache: HybridCache | None = None, index: int = 0) -> torch.Tensor:
        b, t, _ = hidden.shape
        q = self.q_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
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


class MLP(nn.Module):
    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, spec.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor, cache: HybridCache | None = None, index: int = 0) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(hidden)).square())


MIXERS = {MAMBA: MambaMixer, ATTENTION: Attention, "mlp": MLP}


class Block(nn.Module):
    def __init__(self, config: HybridConfig, spec: BlockSpec) -> None:
        super().__init__()
        self.index = spec.index
        self.kind = spec.kind
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MIXERS[spec.kind](config, spec)

    def forward(self, hidden: torch.Tensor, cache: HybridCache | None = None) -> torch.Tensor:
        normed = self.norm(hidden.to(self.norm.weight.dtype))
        return hidden + self.mixer(normed, cache, self.index)


class Backbone(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, spec) for spec in config.blocks)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(
        self, input_ids: torch.Tensor, cache: HybridCache | None = None, skip_blocks: Collection[int] = ()
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids)  # (b, t, hidden)
        if self.residual_in_fp32:
            hidden = hidden.float()
        for block in self.layers:
            if block.index not in skip_blocks:
                hidden = block(hidden, cache)
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
        """Parameters by component: embeddings, lm_head, mamba, attention, mlp, norms (block norms + norm_f).

        Tied embeddings count once, under embeddings."""
        counts = dict.fromkeys(("embeddings", "lm_head", MAMBA, ATTENTION, "mlp", "norms"), 0)
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
        """Random initialisation following nemotron_h's scheme (normal linears and embeddings, S4D-real A,
        log-uniform dt, out_proj scaled by 1/sqrt(blocks))."""
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
