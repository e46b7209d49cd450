"""Inference cache: what a hybrid model keeps between decoding steps.

- attention blocks: keys and values, (batch, kv_heads, max_length, head_dim), preallocated;
- Mamba blocks: the last K-1 inputs of the causal convolution, (batch, conv_dim, K-1), and the SSM state,
  (batch, heads, head_dim, state_size), fp32 by default (`mamba_ssm_cache_dtype`);
- MLP and MoE blocks keep nothing.

All sequences of a batch advance together; `seen` counts the tokens already processed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.config import ATTENTION, MAMBA, HybridConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AttentionState:
    key: torch.Tensor  # (batch, kv_heads, max_length, head_dim)
    value: torch.Tensor


@dataclass
class MambaState:
    conv: torch.Tensor  # (batch, conv_dim, K - 1)
    ssm: torch.Tensor  # (batch, heads, head_dim, state_size)


class HybridCache:
    """Preallocated per-block state for decoding up to `max_length` tokens."""

    def __init__(
        self,
        config: HybridConfig,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_dtype: torch.dtype | None = None,
        ssm_dtype: torch.dtype | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.max_length = max_length
        self.seen = 0
        kv_dtype = kv_dtype or dtype
        ssm_dtype = ssm_dtype or _DTYPES[config.mamba_ssm_cache_dtype]
        self.layers: dict[int, AttentionState | MambaState] = {}
        for spec in config.blocks:
            if spec.kind == ATTENTION:
                shape = (batch_size, spec.num_key_value_heads, max_length, spec.head_dim)
                self.layers[spec.index] = AttentionState(
                    key=torch.zeros(shape, dtype=kv_dtype, device=device),
                    value=torch.zeros(shape, dtype=kv_dtype, device=device),
                )
            elif spec.kind == MAMBA:
                conv_dim = spec.mamba_intermediate + 2 * config.n_groups * config.ssm_state_size
                self.layers[spec.index] = MambaState(
                    conv=torch.zeros(batch_size, conv_dim, config.conv_kernel - 1, dtype=dtype, device=device),
                    ssm=torch.zeros(
                        batch_size,
                        spec.mamba_num_heads,
                        spec.mamba_head_dim,
                        config.ssm_state_size,
                        dtype=ssm_dtype,
                        device=device,
                    ),
                )

    def nbytes(self) -> int:
        """Bytes held by all cache tensors."""
        total = 0
        for state in self.layers.values():
            for tensor in vars(state).values():
                total += tensor.numel() * tensor.element_size()
        return total

    def check_room(self, new_tokens: int) -> None:
        if self.seen + new_tokens > self.max_length:
            raise ValueError(f"cache holds {self.max_length} tokens; {self.seen} seen + {new_tokens} new exceeds it")
