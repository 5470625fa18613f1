"""continual-inference's transformer API (``import continual as co``) on streamtx's layers: change the import, keep
the code.

Every class takes the reference's constructor arguments (names, order, defaults) and follows its conventions:
tensors are ``(N, E, T)`` (batch, features, time) for ``forward`` / ``forward_steps`` and ``(N, E)`` for
``forward_step``; the module holds its stream state itself (``clean_state()`` empties it, ``update_state=False``
computes a step without keeping it); a step returns ``None`` until ``sequence_len`` tokens have arrived (warm-up),
and ``forward_steps`` stacks only the steps that returned something on dim 2 (``None`` if none did). ``delay``,
``receptive_field``, ``stride`` and ``padding`` have the reference's values.

Underneath, each layer is one :class:`~streamtx.nn.transformer.eTransformerEncoderLayer` over the trivial group
(``Representation.regular(trivial_group(), d_model)``: plain dense layers, the same numbers as
``torch.nn.TransformerEncoderLayer``), streamed by :class:`~streamtx.nn.retroactive.eRetroactiveEncoderLayer`; these
adapters only transpose layouts, map arguments and keep the state. A ``state_dict`` saved from the reference loads
into them as it is (its key layout is translated on load).

Where the reference is wrong, streamtx's result stands (tested against the reference in
``tests/compat/test_continual_compat.py``):

* ``RetroactiveTransformerEncoderLayer``: the reference's residual delay line wraps modulo ``sequence_len - 1``
  instead of ``sequence_len`` (continual-inference 1.2.x), so from step ``2 n - 2`` on (``n = sequence_len``,
  steps counted from 0) it adds the residual of the wrong tokens and its window outputs are wrong; here every step
  equals ``forward`` on the window.
* ``TransformerEncoder`` with ``num_layers >= 3``: the reference's middle layers (``MhaType.REGULAR``) are not
  implemented and construction fails; here they apply the batch layer to the window, so any depth works.
* ``TransformerEncoderLayerFactory(activation="gelu")``: the reference maps ``"gelu"`` to ReLU; here it is GELU.
* ``RecyclingPositionalEncoding(learned=False)``: the static table is streamtx's sinusoidal one, not the cyclic
  pattern of Ma et al.; loading the reference's ``pe.pattern`` buffer gives its exact numbers.
* Dropout: a retroactive step never forms attention weights, so in training mode with ``dropout > 0`` a retroactive
  ``forward_step`` raises (call ``.eval()``); the reference logs a warning, skips attention dropout and still
  applies the feed-forward dropout.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Callable
from enum import Enum
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..nn.positional import RecyclingPositionalEncoding as _RecyclingTable
from ..nn.retroactive import RetroactiveState, eRetroactiveEncoderLayer
from ..nn.state import StreamState
from ..nn.transformer import EncoderLayerState, eTransformerEncoderLayer
from ..symmetry import Representation, trivial_group

__all__ = [
    "MhaType",
    "RetroactiveTransformerEncoderLayer",
    "SingleOutputTransformerEncoderLayer",
    "TransformerEncoderLayerFactory",
    "TransformerEncoder",
    "RecyclingPositionalEncoding",
]

Activation = nn.Module | Callable[[Tensor], Tensor] | str


class MhaType(Enum):
    """Which attention a :func:`TransformerEncoderLayerFactory` layer uses (the reference's values)."""

    RETROACTIVE = "retroactive"
    SINGLE_OUTPUT = "single_output"
    SINGLE_OUTPUT_FORWARD = "single_output_forward"
    REGULAR = "regular"


def _check_features(x: Tensor, d_model: int, dims: int, method: str) -> None:
    layout = "(N, E)" if dims == 2 else "(N, E, T)"
    if not isinstance(x, Tensor) or x.dim() != dims or x.shape[1] != d_model:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{method}: expected input {layout} with E = {d_model}, got {shape}")


# Reference key (after the module's prefix) -> torch.nn.TransformerEncoderLayer key. The retroactive layer nests
# norms and feed-forward as `1.fn.norm1` / `1.fn._ff_block.fn.linear1`, the single-output one as `1.norm1.fn` /
# `1._ff_block.1.linear1`; inside a TransformerEncoder every layer but the first sits under one more `fn.`.
_REFERENCE_KEYS = [
    (re.compile(r"^(?:fn\.)?0\.self_attn\.(.+)$"), r"self_attn.\1"),
    (re.compile(r"^(?:fn\.)?1\.(?:fn\.)?(norm[12])\.(?:fn\.)?(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^(?:fn\.)?1\.(?:fn\.)?_ff_block\.(?:fn|1)\.(linear[12])\.(weight|bias)$"), r"\1.\2"),
]


def _torch_keys(state_dict: dict[str, Any], prefix: str) -> dict[str, str]:
    """``{reference key: torch layer key}`` for the reference-layout keys under ``prefix``."""
    found = {}
    for key in state_dict:
        if not key.startswith(prefix):
            continue
        for pattern, target in _REFERENCE_KEYS:
            if pattern.match(key[len(prefix) :]):
                found[key] = pattern.sub(target, key[len(prefix) :])
    return found


_State = RetroactiveState | EncoderLayerState


def _batch_size(state: StreamState) -> int:
    return next(t for _, t in state.state_dict().items()).shape[0]


class _ContinualLayer(nn.Module):
    """A streamtx encoder layer behind the reference's stateful ``(N, E, T)`` interface.

    ``stream`` (an :class:`eRetroactiveEncoderLayer`) holds the layer; ``layer`` is that layer.
    """

    stream: eRetroactiveEncoderLayer

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        activation: Activation,
        layer_norm_eps: float,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        sequence_len: int | None,
        single_output: bool,
    ) -> None:
        super().__init__()
        if isinstance(sequence_len, bool) or not isinstance(sequence_len, int) or sequence_len < 1:
            raise ValueError(f"sequence_len: expected a positive int (the attention window), got {sequence_len!r}")
        layer = eTransformerEncoderLayer(
            Representation.regular(trivial_group(), d_model),
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first=True,
            norm_first=False,
            device=device,
            dtype=dtype,
        )
        self.d_model, self.sequence_len = d_model, sequence_len
        self.stream = eRetroactiveEncoderLayer(layer, sequence_len, single_output=single_output)
        self._state: _State | None = None
        self._seen = 0  # tokens entered since the last clean_state (all rows advance together)
        self._register_load_state_dict_pre_hook(self._load_reference_keys)

    @property
    def layer(self) -> eTransformerEncoderLayer:
        return self.stream.layer

    # ---------------------------------------------------------------- the reference's module attributes
    @property
    def delay(self) -> int:
        """Steps before the first output: ``sequence_len - 1``."""
        return self.sequence_len - 1

    @property
    def receptive_field(self) -> int:
        return self.sequence_len

    @property
    def stride(self) -> tuple[int, ...]:
        return (1,)

    @property
    def padding(self) -> tuple[int, ...]:
        return (0,)

    def clean_state(self) -> None:
        """Forget the stream (the next step starts a new warm-up)."""
        self._state, self._seen = None, 0

    def snapshot(self) -> tuple[_State | None, int]:
        """A copy of the stream, for ``forward_steps(update_state=False)``."""
        return (None if self._state is None else self._state.clone()), self._seen

    def restore(self, saved: tuple[_State | None, int]) -> None:
        """Set the stream back to what :meth:`snapshot` returned."""
        self._state, self._seen = saved

    # ---------------------------------------------------------------- batch and streaming
    def forward(self, input: Tensor) -> Tensor:
        """``(N, E, T) -> (N, E, T)``: the layer with full attention over the ``T`` tokens (torch's layer)."""
        _check_features(input, self.d_model, 3, "forward")
        return self.stream(input.transpose(1, 2)).transpose(1, 2)

    def forward_step(self, input: Tensor, update_state: bool = True) -> Tensor | None:
        """One new token ``(N, E)``; ``None`` during the first ``sequence_len - 1`` steps, then the output after
        this token (see the subclass for its shape)."""
        _check_features(input, self.d_model, 2, "forward_step")
        state = self._state
        if state is not None and _batch_size(state) != input.shape[0]:
            raise ValueError(
                f"forward_step: the stream holds {_batch_size(state)} rows, got a batch of {input.shape[0]}; "
                "call clean_state() to start a stream of another batch size"
            )
        if state is None:
            state = self.stream.init_state(input.shape[0], dtype=input.dtype, device=input.device)
        elif not update_state:
            state = state.clone()
        y, state = self.stream.forward_step(input, state)
        seen = self._seen + 1
        if update_state:
            self._state, self._seen = state, seen
        return self._step_output(y) if seen >= self.sequence_len else None

    def forward_steps(self, input: Tensor, pad_end: bool = False, update_state: bool = True) -> Tensor | None:
        """Step every token of ``(N, E, T)``; the outputs of the steps past the warm-up stacked on dim 2, or
        ``None``. ``pad_end`` has no effect: these layers have no end padding (``padding == (0,)``), as in the
        reference."""
        _check_features(input, self.d_model, 3, "forward_steps")
        saved = self.snapshot()
        outs = [y for t in range(input.shape[2]) if (y := self.forward_step(input[:, :, t])) is not None]
        if not update_state:
            self.restore(saved)
        return torch.stack(outs, dim=2) if outs else None

    @abstractmethod
    def _step_output(self, y: Tensor) -> Tensor:
        """The reference's step output from the streamtx step output ``y`` (batch first)."""

    # ---------------------------------------------------------------- loading the reference's checkpoints
    def _load_reference_keys(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Translate a reference ``state_dict`` (keys under ``prefix``) into this module's keys, in place."""
        keys = _torch_keys(state_dict, prefix)
        if not keys:
            return
        attn, ff = self.layer.self_attn, self.layer.linear1
        ref = nn.TransformerEncoderLayer(
            self.d_model,
            attn.num_heads,
            ff.weight.shape[0],
            dropout=0.0,
            batch_first=True,
            device=ff.weight.device,
            dtype=ff.weight.dtype,
        )
        ref.load_state_dict({keys[k]: state_dict.pop(k) for k in keys})
        self.layer.load_torch_(ref)
        for name, value in self.layer.state_dict(prefix=f"{prefix}stream.layer.").items():
            state_dict[name] = value


class RetroactiveTransformerEncoderLayer(_ContinualLayer):
    """``co.RetroactiveTransformerEncoderLayer``: after each token, the updated outputs of the whole window.

    ``forward``: ``(N, E, T) -> (N, E, T)``, ``torch.nn.TransformerEncoderLayer`` (post-norm, no mask).
    ``forward_step``: ``(N, E) -> (N, E, sequence_len)`` (oldest token first), equal to ``forward`` on the last
    ``sequence_len`` tokens, for streams of any length; ``None`` during warm-up. ``forward_steps``:
    ``(N, E, T) -> (N, E, T', sequence_len)``. The window is updated by streamtx's retroactive attention
    (:class:`~streamtx.nn.retroactive.eRetroactiveEncoderLayer`, O(n d) attention work per step, stable for any logit
    scale). Differs from the reference after the reference's ring wraps (steps ``>= 2 sequence_len - 2``), where
    the reference is wrong: see the module docstring.

    Examples::

        encoder_layer = RetroactiveTransformerEncoderLayer(d_model=512, nhead=8, sequence_len=32, dropout=0.0)
        x = torch.rand(10, 512, 32)  # (N, E, T)
        out = encoder_layer.forward(x)
        firsts = encoder_layer.forward_steps(x[:, :, :-1])
        last = encoder_layer.forward_step(x[:, :, -1])
        assert firsts is None  # the module first needs to observe ``sequence_len`` values
        assert torch.allclose(out, last, atol=1e-6)
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = nn.functional.relu,
        layer_norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        sequence_len: int | None = None,
    ) -> None:
        super().__init__(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, device, dtype, sequence_len, False
        )

    def _step_output(self, y: Tensor) -> Tensor:
        return y.transpose(1, 2)  # (N, n, E) -> (N, E, n)


class SingleOutputTransformerEncoderLayer(_ContinualLayer):
    """``co.SingleOutputTransformerEncoderLayer``: after each token, the output of one query of the window
    (``query_index``, default the newest) attending to the whole window.

    ``forward``: ``(N, E, T) -> (N, E, T)`` (torch's layer), or with ``single_output_forward=True`` only the
    ``query_index`` token's output ``(N, E, 1)``. ``forward_step``: ``(N, E) -> (N, E)``, equal to
    ``forward(window)[:, :, query_index]``; ``None`` during warm-up. With ``query_index = -1`` a step is streamtx's
    causal-window step (a key/value ring, O(n d)); another ``query_index`` reads that row of the retroactive
    window update.

    Examples::

        encoder_layer = SingleOutputTransformerEncoderLayer(d_model=512, nhead=8, sequence_len=32, dropout=0.0)
        x = torch.rand(10, 512, 32)  # (N, E, T)
        out = encoder_layer.forward(x)
        firsts = encoder_layer.forward_steps(x[:, :, :-1])
        last = encoder_layer.forward_step(x[:, :, -1])
        assert firsts is None
        assert torch.allclose(out[:, :, -1], last, atol=1e-6)
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = nn.functional.relu,
        layer_norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        sequence_len: int | None = None,
        single_output_forward: bool = False,
        query_index: int = -1,
    ) -> None:
        if isinstance(sequence_len, int) and not -sequence_len <= query_index < sequence_len:
            raise ValueError(f"query_index: expected an index into a window of {sequence_len}, got {query_index}")
        newest = isinstance(sequence_len, int) and query_index % sequence_len == sequence_len - 1
        super().__init__(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, device, dtype, sequence_len, newest
        )
        self.single_output_forward, self.query_index = bool(single_output_forward), query_index

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        return out[:, :, [self.query_index]] if self.single_output_forward else out

    def _step_output(self, y: Tensor) -> Tensor:
        return y if self.stream.single_output else y[:, self.query_index]  # (N, E)

    def extra_repr(self) -> str:
        return f"single_output_forward={self.single_output_forward}, query_index={self.query_index}"


def TransformerEncoderLayerFactory(
    d_model: int,
    nhead: int,
    dim_feedforward: int = 2048,
    dropout: float = 0.1,
    activation: Activation = nn.functional.relu,
    layer_norm_eps: float = 1e-5,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    sequence_len: int | None = None,
) -> Callable[[MhaType | str], _ContinualLayer]:
    """``co.TransformerEncoderLayerFactory``: the layer hyper-parameters, as a function of the attention type
    (``"retroactive"``, ``"single_output"``, ``"single_output_forward"``, ``"regular"``) returning a layer.

    Differences: ``"regular"`` (the reference's is unimplemented) gives a :class:`RetroactiveTransformerEncoderLayer`,
    whose ``forward`` on the window is what a middle layer of :class:`TransformerEncoder` computes each step;
    ``activation="gelu"`` is GELU (the reference silently uses ReLU).
    """
    kinds: dict[MhaType, Callable[..., _ContinualLayer]] = {
        MhaType.RETROACTIVE: RetroactiveTransformerEncoderLayer,
        MhaType.SINGLE_OUTPUT: SingleOutputTransformerEncoderLayer,
        MhaType.SINGLE_OUTPUT_FORWARD: partial(SingleOutputTransformerEncoderLayer, single_output_forward=True),
        MhaType.REGULAR: RetroactiveTransformerEncoderLayer,
    }

    def TransformerEncoderLayer(mha_type: MhaType | str) -> _ContinualLayer:
        return kinds[MhaType(mha_type)](
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, device, dtype, sequence_len
        )

    return TransformerEncoderLayer


class TransformerEncoder(nn.Module):
    """``co.TransformerEncoder``: ``num_layers`` encoder layers from a :func:`TransformerEncoderLayerFactory`,
    then ``norm`` (optional, over ``E``).

    ``num_layers == 1``: a :class:`SingleOutputTransformerEncoderLayer` (``forward (N, E, T) -> (N, E, T)``,
    ``forward_step (N, E) -> (N, E)``). ``num_layers >= 2``, as in the reference: the first layer is retroactive,
    the middle ones recompute the window, the last computes only the newest token: ``forward (N, E, T) ->
    (N, E, 1)`` (the newest token's output of the batch stack over all ``T``), ``forward_step (N, E) -> (N, E)``
    (that of the stack over the last ``sequence_len`` tokens), ``None`` during warm-up. Works for any depth (the
    reference fails to build 3 or more layers) and for any stream length (the reference's first layer goes wrong
    after its ring wraps). A step costs one retroactive update plus ``num_layers - 1`` batch layers over the window:
    fewer, wider layers stream cheapest.

    Examples::

        encoder_layer = TransformerEncoderLayerFactory(d_model=512, nhead=8, sequence_len=32)
        transformer_encoder = TransformerEncoder(encoder_layer, num_layers=2)
        src = torch.rand(10, 512, 32)
        out = transformer_encoder(src)
    """

    def __init__(
        self,
        encoder_layer: Callable[[MhaType | str], _ContinualLayer],
        num_layers: int,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        if num_layers == 1:
            kinds = [MhaType.SINGLE_OUTPUT]
        else:
            kinds = [MhaType.RETROACTIVE, *[MhaType.REGULAR] * (num_layers - 2), MhaType.SINGLE_OUTPUT_FORWARD]
        self.layers = nn.ModuleList([encoder_layer(kind) for kind in kinds])
        self.num_layers = num_layers
        self.norm = norm
        self._register_load_state_dict_pre_hook(self._load_reference_keys)

    @property
    def _first(self) -> _ContinualLayer:
        return cast(_ContinualLayer, self.layers[0])

    @property
    def delay(self) -> int:
        return self._first.delay

    @property
    def receptive_field(self) -> int:
        return self._first.receptive_field

    @property
    def stride(self) -> tuple[int, ...]:
        return (1,)

    @property
    def padding(self) -> tuple[int, ...]:
        return (0,)

    def clean_state(self) -> None:
        self._first.clean_state()

    def _norm(self, x: Tensor) -> Tensor:
        """``norm`` over the feature dim 1 of ``(N, E)`` or ``(N, E, T)``."""
        return x if self.norm is None else self.norm(x.movedim(1, -1)).movedim(-1, 1)

    def _upper(self, window: Tensor) -> Tensor:
        """Layers 2.. on the first layer's output ``(N, E, T)``."""
        for layer in self.layers[1:]:
            window = layer(window)
        return window

    def forward(self, input: Tensor) -> Tensor:
        return self._norm(self._upper(self._first(input)))

    def forward_step(self, input: Tensor, update_state: bool = True) -> Tensor | None:
        """One token ``(N, E)`` -> ``(N, E)`` or ``None`` during warm-up."""
        first = self._first.forward_step(input, update_state)
        if first is None or self.num_layers == 1:
            return None if first is None else self._norm(first)
        return self._norm(self._upper(first)[:, :, -1])

    def forward_steps(self, input: Tensor, pad_end: bool = False, update_state: bool = True) -> Tensor | None:
        """Step every token of ``(N, E, T)``; the outputs past the warm-up stacked on dim 2, or ``None``."""
        _check_features(input, self._first.d_model, 3, "forward_steps")
        saved = self._first.snapshot()  # the only state of the stack
        outs = [y for t in range(input.shape[2]) if (y := self.forward_step(input[:, :, t])) is not None]
        if not update_state:
            self._first.restore(saved)
        return torch.stack(outs, dim=2) if outs else None

    def _load_reference_keys(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """The reference wraps ``norm`` in a ``co.Lambda``: ``norm.fn.*`` -> ``norm.*`` (the layers translate
        their own keys)."""
        for key in [k for k in state_dict if k.startswith(f"{prefix}norm.fn.")]:
            state_dict[f"{prefix}norm.{key[len(prefix) + len('norm.fn.') :]}"] = state_dict.pop(key)

    @staticmethod
    def build_from(trans_enc: nn.TransformerEncoder, sequence_len: int) -> TransformerEncoder:
        """A continual encoder with the weights of a post-norm ``torch.nn.TransformerEncoder``."""
        if not isinstance(trans_enc, nn.TransformerEncoder):
            raise TypeError(f"trans_enc: expected a torch.nn.TransformerEncoder, got {type(trans_enc).__name__}")
        first = trans_enc.layers[0]
        if first.norm_first:
            raise ValueError("trans_enc: continual-inference's layers are post-norm; got norm_first=True")
        factory = TransformerEncoderLayerFactory(
            d_model=first.self_attn.embed_dim,
            nhead=first.self_attn.num_heads,
            dim_feedforward=first.linear1.out_features,
            dropout=first.dropout.p,
            activation=first.activation,
            layer_norm_eps=first.norm1.eps,
            device=first.linear1.weight.device,
            dtype=first.linear1.weight.dtype,
            sequence_len=sequence_len,
        )
        net = TransformerEncoder(factory, num_layers=trans_enc.num_layers, norm=trans_enc.norm)
        for ours, theirs in zip(net.layers, trans_enc.layers):
            cast(_ContinualLayer, ours).layer.load_torch_(theirs)
        return net


class RecyclingPositionalEncoding(nn.Module):
    """``co.RecyclingPositionalEncoding``: adds a position embedding, with ids recycled modulo ``num_embeds``, on
    :class:`streamtx.nn.positional.RecyclingPositionalEncoding` (over the trivial group).

    ``forward(input (N, E, T))`` adds ids ``state_index + 0..T-1`` and then advances ``state_index`` by
    ``forward_update_index_steps`` (or ``update_index_steps``); ``forward_step(input (N, E))`` adds id
    ``state_index`` and advances it by one; ``forward_steps`` is ``forward`` advancing by ``T``. ``learned=True``:
    an embedding initialised ``N(0, 1)`` like the reference's ``nn.Embedding``; ``learned=False``: a fixed
    sinusoidal table (the reference uses the cyclic pattern of Ma et al.; loading its ``pe.pattern`` gives those
    numbers exactly). With a window ``n``, ``num_embeds >= 2 n - 1`` keeps every id inside a window distinct.

    Examples::

        pe = RecyclingPositionalEncoding(embed_dim=10, num_embeds=16 * 2 - 1, forward_update_index_steps=0)
        x = torch.zeros((1, 10, 16))  # (B, C, T)
        o_forward = pe.forward(x)
        o_forward_steps = pe.forward_steps(x[:, :, :-1])
        o_forward_step = pe.forward_step(x[:, :, -1])
        assert torch.equal(o_forward[:, :, :-1], o_forward_steps)
        assert torch.equal(o_forward[:, :, -1], o_forward_step)
    """

    state_index: Tensor

    def __init__(
        self, embed_dim: int, num_embeds: int, learned: bool = True, forward_update_index_steps: int = 1
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_embeds, self.learned = embed_dim, num_embeds, learned
        self.forward_update_index_steps = forward_update_index_steps
        self.pe = _RecyclingTable(embed_dim, 1, num_embeds, learned=learned)
        self.register_buffer("state_index", torch.tensor(0), persistent=False)
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._load_reference_keys)

    def reset_parameters(self) -> None:
        if self.learned:
            nn.init.normal_(self.pe.table)

    @property
    def delay(self) -> int:
        return 0

    @property
    def receptive_field(self) -> int:
        return 1

    @property
    def stride(self) -> tuple[int, ...]:
        return (1,)

    @property
    def padding(self) -> tuple[int, ...]:
        return (0,)

    def clean_state(self) -> None:
        self.state_index = torch.zeros_like(self.state_index)

    def _add(self, x: Tensor, count: int) -> Tensor:
        """``x (N, E, T)`` plus the embeddings of ids ``state_index + 0..count-1``."""
        pos = self.state_index + torch.arange(count, device=x.device)
        return self.pe(x.transpose(1, 2), pos).transpose(1, 2)

    def forward(self, input: Tensor, update_index_steps: int | None = None) -> Tensor:
        _check_features(input, self.embed_dim, 3, "forward")
        if input.shape[2] > self.num_embeds:
            raise ValueError(f"forward: expected at most num_embeds = {self.num_embeds} tokens, got {input.shape[2]}")
        out = self._add(input, input.shape[2])
        steps = self.forward_update_index_steps if update_index_steps is None else update_index_steps
        self.state_index = (self.state_index + steps) % self.num_embeds
        return out

    def forward_steps(self, input: Tensor, pad_end: bool = False, update_state: bool = True) -> Tensor:
        return self.forward(input, update_index_steps=input.shape[2] if update_state else 0)

    def forward_step(self, input: Tensor, update_state: bool = True) -> Tensor:
        _check_features(input, self.embed_dim, 2, "forward_step")
        out = self._add(input[:, :, None], 1)[:, :, 0]
        if update_state:
            self.state_index = (self.state_index + 1) % self.num_embeds
        return out

    def _load_reference_keys(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """The reference stores the table as ``pe.weight`` (learned) or ``pe.pattern`` (static)."""
        for name in ("weight", "pattern"):
            if f"{prefix}pe.{name}" in state_dict:
                state_dict[f"{prefix}pe.table"] = state_dict.pop(f"{prefix}pe.{name}")

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_embeds={self.num_embeds}, learned={self.learned}, "
            f"forward_update_index_steps={self.forward_update_index_steps}"
        )
