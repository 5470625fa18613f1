"""Norm-first O(3)-equivariant transformer blocks over tokens with 3-D positions, and a stack of them, streamable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar, cast, overload

import torch
from torch import Tensor, nn

from ..state import Rows, StreamState
from .attention import O3AttentionState, O3MemoryState, O3MultiheadAttention, check_token_stream
from .mlp import GatedMLP
from .norm import O3LayerNorm

__all__ = ["O3TransformerBlock", "O3TransformerEncoder", "O3EncoderState"]

_State = TypeVar("_State", bound=O3AttentionState | O3MemoryState)
"""The state a block's step takes and returns (causal-window or whole-step)."""


class StreamSteps:
    """``forward_steps`` of the blocks and stacks of this module (they define ``forward_step``). With causal-window
    states, ``T`` steps of one token each are one step of ``T`` tokens (the same numbers); with whole-step states
    (``init_state(memory_window=...)``, where a step's tokens see each other) they run as ``T`` steps."""

    def forward_steps(
        self, x: Tensor, state: Any, /, *, rows: Rows = None, positions: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        """Stream ``x (b, T, P, C, F)`` at ``positions (b, T, 3)`` -> ``(b, T, P, C, F)``, equal to ``T``
        single-token :meth:`forward_step` calls."""
        check_token_stream(x)
        step = self.forward_step  # type: ignore[attr-defined]
        layers = state.layers if isinstance(state, O3EncoderState) else [state]
        if not any(isinstance(s, O3MemoryState) for s in layers):
            return step(x, state, rows=rows, positions=positions)
        outs = [
            step(x[:, t], state, rows=rows, positions=None if positions is None else positions[:, t])[0]
            for t in range(x.shape[1])
        ]
        return torch.stack(outs, dim=1), state


class O3TransformerBlock(StreamSteps, nn.Module):
    r"""``x = x + attn(norm1(x), positions); x = x + mlp(norm2(x))`` with :class:`O3LayerNorm`,
    :class:`O3MultiheadAttention` and :class:`GatedMLP`; for every ``g`` in O(3) and translation ``t``:
    ``block(g . x, g p + t) = g . block(x, p)``.

    Args:
        features: channels ``F`` (input and output).
        max_degree: ``L``.
        num_heads: attention heads (divide ``features``).
        hidden_features: channels of the MLP's hidden layer (default ``2 F``).
        include_pseudotensors: ``P = 2`` instead of ``P = 1``.
        eps: of the norms.
        **attention: further options of :class:`O3MultiheadAttention` (``num_basis``, ``cutoff``, ``radial``,
            ``basis_max_degree``, ``use_relative_positional_encoding_qk``/``_v``, ``softmax_cutoff``, biases, ...).

    Shapes: ``x (B, N, P, (L+1)**2, F)``, ``positions (B, N, 3)`` -> like ``x``.
    """

    def __init__(
        self,
        features: int,
        max_degree: int,
        num_heads: int = 1,
        *,
        hidden_features: int | None = None,
        include_pseudotensors: bool = False,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **attention: Any,
    ) -> None:
        super().__init__()
        for name in ("qkv_features", "out_features"):
            if name in attention:
                raise ValueError(f"{name}: a residual block keeps F={features} channels; not configurable here")
        self.attn = O3MultiheadAttention(
            features,
            max_degree,
            num_heads,
            include_pseudotensors=include_pseudotensors,
            **attention,
            device=device,
            dtype=dtype,
        )
        layout = self.attn.layout
        self.norm1 = O3LayerNorm(layout, features, eps, device=device, dtype=dtype)
        self.norm2 = O3LayerNorm(layout, features, eps, device=device, dtype=dtype)
        self.mlp = GatedMLP(layout, features, hidden_features or 2 * features, device=device, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        *,
        dst_idx: Tensor | None = None,
        src_idx: Tensor | None = None,
    ) -> Tensor:
        """Batch forward; ``mask``/``dst_idx``/``src_idx`` as in :meth:`O3MultiheadAttention.forward`."""
        x = x + self.attn(self.norm1(x), positions, mask, dst_idx=dst_idx, src_idx=src_idx)
        return x + self.mlp(self.norm2(x))

    @overload
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int,
        max_tokens_per_step: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3AttentionState: ...

    @overload
    def init_state(
        self,
        batch_size: int,
        /,
        *,
        memory_window: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3MemoryState: ...

    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int | None = None,
        max_tokens_per_step: int = 1,
        memory_window: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3AttentionState | O3MemoryState:
        """The attention's ring cache (norms and MLP act per token and need no state), of one of two kinds:

        * ``window``: causal-window self-attention, token ``t`` sees tokens ``t - window + 1 .. t``;
        * ``memory_window``: whole-step self-attention, the tokens of a step join the ring first and each then sees
          the ``memory_window`` newest tokens, its whole step included: no order inside a step, so a step's tokens
          form a set (with ``E`` tokens every step and ``memory_window = W E``: the ``W`` newest steps).
        """
        if memory_window is not None:
            if window is not None:
                raise ValueError(
                    f"init_state: give either window or memory_window, got window={window!r}, "
                    f"memory_window={memory_window!r}"
                )
            return self.attn.init_state(batch_size, memory_window=memory_window, dtype=dtype, device=device)
        if window is None:
            raise ValueError("init_state: give window (causal-window) or memory_window (whole-step self-attention)")
        return self.attn.init_state(
            batch_size, window=window, max_tokens_per_step=max_tokens_per_step, dtype=dtype, device=device
        )

    def forward_step(
        self, x: Tensor, state: _State, /, *, rows: Rows = None, positions: Tensor | None = None
    ) -> tuple[Tensor, _State]:
        """New tokens ``(b, P, C, F)`` / ``(b, S, P, C, F)`` at ``positions (b, 3)`` / ``(b, S, 3)``; equal to
        :meth:`forward` on the whole stream with ``mask=band_mask(t, t, window)`` (causal-window state), or with
        ``mask[i, j] = 0 <= n_i - 1 - j < memory_window``, ``n_i`` the tokens up to query ``i``'s step (whole-step
        state)."""
        if not isinstance(state, (O3AttentionState, O3MemoryState)):
            raise TypeError(
                f"state: expected an O3AttentionState or O3MemoryState (see init_state), got {type(state).__name__}"
            )
        h = self.norm1(x)
        if isinstance(state, O3MemoryState):  # the step's tokens are keys too: a self-attention over whole steps
            a, _ = self.attn.forward_step(h, state, rows=rows, positions=positions, kv=h, kv_positions=positions)
        else:
            a, _ = self.attn.forward_step(h, state, rows=rows, positions=positions)
        x = x + a
        return x + self.mlp(self.norm2(x)), state


@dataclass
class O3EncoderState(StreamState):
    """One attention ring per block of an :class:`O3TransformerEncoder` (all of one kind)."""

    layers: list[O3AttentionState | O3MemoryState]


class O3TransformerEncoder(StreamSteps, nn.Module):
    """``num_layers`` :class:`O3TransformerBlock` and a final :class:`O3LayerNorm`. Streaming with a causal window
    ``W`` in every block is exact for any depth (the receptive field grows by ``W - 1`` tokens per block).

    Args:
        num_layers: blocks.
        features, max_degree, num_heads, **block: as :class:`O3TransformerBlock`.

    Shapes: ``x (B, N, P, (L+1)**2, F)``, ``positions (B, N, 3)`` -> like ``x``.
    """

    def __init__(self, num_layers: int, features: int, max_degree: int, num_heads: int = 1, **block: Any) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected an integer >= 1, got {num_layers!r}")
        blocks = [O3TransformerBlock(features, max_degree, num_heads, **block) for _ in range(num_layers)]
        self.layers = nn.ModuleList(blocks)
        self.norm = O3LayerNorm(
            blocks[0].attn.layout,
            features,
            block.get("eps", 1e-5),
            device=block.get("device"),
            dtype=block.get("dtype"),
        )

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        *,
        dst_idx: Tensor | None = None,
        src_idx: Tensor | None = None,
    ) -> Tensor:
        for layer in self._blocks():
            x = layer(x, positions, mask, dst_idx=dst_idx, src_idx=src_idx)
        return self.norm(x)

    def _blocks(self) -> list[O3TransformerBlock]:
        """The blocks with their type (``nn.ModuleList`` items are typed as plain modules)."""
        return [cast(O3TransformerBlock, layer) for layer in self.layers]

    def init_state(
        self,
        batch_size: int,
        /,
        *,
        window: int | None = None,
        max_tokens_per_step: int = 1,
        memory_window: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> O3EncoderState:
        """One ring per block, each with the causal ``window`` or the whole-step ``memory_window``
        (:meth:`O3TransformerBlock.init_state`)."""
        if memory_window is not None:
            if window is not None:
                raise ValueError(
                    f"init_state: give either window or memory_window, got window={window!r}, "
                    f"memory_window={memory_window!r}"
                )
            return O3EncoderState(
                [
                    layer.init_state(batch_size, memory_window=memory_window, dtype=dtype, device=device)
                    for layer in self._blocks()
                ]
            )
        if window is None:
            raise ValueError("init_state: give window (causal-window) or memory_window (whole-step self-attention)")
        return O3EncoderState(
            [
                layer.init_state(
                    batch_size, window=window, max_tokens_per_step=max_tokens_per_step, dtype=dtype, device=device
                )
                for layer in self._blocks()
            ]
        )

    def forward_step(
        self, x: Tensor, state: O3EncoderState, /, *, rows: Rows = None, positions: Tensor | None = None
    ) -> tuple[Tensor, O3EncoderState]:
        """New tokens through every block in turn; equal to :meth:`forward` with ``mask=band_mask(t, t, window)``."""
        if not isinstance(state, O3EncoderState) or len(state.layers) != len(self.layers):
            raise TypeError(
                f"state: expected the O3EncoderState of this encoder's init_state, got {type(state).__name__}"
            )
        for layer, layer_state in zip(self._blocks(), state.layers):
            x, _ = layer.forward_step(x, layer_state, rows=rows, positions=positions)
        return self.norm(x), state
