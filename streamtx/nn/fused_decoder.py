"""Fused Triton kernels of a lowered decoder layer (:class:`~streamtx.nn.lowered.Decoder`): three kernels per layer
for the few rows of a control step, instead of ~17 (GEMMs, attentions, add + norm pairs).

A control step evaluates the decoder K times on ``b x Tx`` action tokens (16 rows per session) of width ``D <= 256``:
every GEMM is a few hundred kFLOP whose weights sit in L2, so the step is bound by the chain of dependent kernels,
not by arithmetic (benchmarks/GPU_NOTES.md). One program takes the ``Tx`` rows of one session and one slice of the
work, holds the rows in registers and fuses everything between two full-row reductions:

* :func:`attention_block`, one program per (session, head): residual stream in (the base plus the producer's partial
  sums plus its bias), norm, this head's projections (fused q/k/v for self-attention; for cross-attention the query
  only, keys and values read from the cached memory), softmax attention with the mask, and this head's share of the
  output projection ``o_h W_o[:, h]^T``, written as a partial sum: ``out(attn) = sum_h o_h W_o[:, h]^T + b_o``.
* :func:`feedforward_block`, one program per (session, hidden chunk): stream in, norm, ``act(h W_1[c]^T + b_1[c])
  W_2[:, c]^T`` written as a partial sum over chunks.
* :func:`residual_stream`, the stack's end: stream in and the final norm.

The consumer of partial sums adds them in a fixed order (deterministic, no atomics), and every program re-reads only
``P x Tx x D`` partials, far cheaper than a GEMM split across programs with a grid-wide barrier. Products are exact
float32 (``input_precision="ieee"``) for float32 weights; bfloat16/float16 weights run on tensor cores with float32
accumulation, the residual stream and the partial sums kept in float32.

Callers check :func:`fused_decoder_unsupported` first (shapes and features these kernels cover); the torch path is
the reference (:class:`~streamtx.nn.lowered.Decoder` compares both on the first call of each shape).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path runs
    triton = None

__all__ = [
    "NormParams",
    "Stream",
    "ACTIVATIONS",
    "fused_decoder_unsupported",
    "attention_block",
    "feedforward_block",
    "residual_stream",
    "scratch",
]

MAX_FEATURES, MAX_TOKENS, MAX_KEYS, FF_CHUNK = 256, 64, 256, 64
K_CHUNK, NUM_WARPS = 16, 8
"""Products run along K in chunks of 16 with 8 warps a program: the float32 kernels then need <= 99 registers a thread
and spill none (ptxas for sm_90, robot shapes; whole-K products at 4 warps spilled up to 2 KB a thread)."""
ACTIVATIONS: dict[Callable[[Tensor], Tensor], int] = {F.gelu: 0, F.relu: 1, F.silu: 2}
"""The feed-forward activations the kernels compute (exact-erf GELU, ReLU, SiLU), by their kernel code."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NormParams(Protocol):
    """What the kernels read of a norm (:class:`~streamtx.nn.lowered.Norm`)."""

    @property
    def rms(self) -> bool: ...
    @property
    def weight(self) -> Tensor | None: ...
    @property
    def bias(self) -> Tensor | None: ...
    @property
    def eps(self) -> float: ...


class Stream(NamedTuple):
    """A kernel's residual-stream input ``x = base + sum_p parts[p] + bias``, then ``x = store_norm(x)`` (post-norm
    layers; ``None``: none), written to the kernel's ``x_out``; the block reads ``h_norm(x)`` (``None``: ``x``).

    ``base (b, T, D)``; ``parts (P, b, T, D)`` contiguous or ``None``; ``bias (D,)`` or ``None``."""

    base: Tensor
    parts: Tensor | None
    bias: Tensor | None
    store_norm: NormParams | None
    h_norm: NormParams | None


def fused_decoder_unsupported(dim: int, num_heads: int, head_dim: int, hidden: int, dtype: torch.dtype) -> str | None:
    """Why the fused kernels cannot run a decoder of this shape (``None``: they can)."""
    if triton is None:
        return "the triton package is not installed"
    if dtype not in _DTYPES:
        return f"dtype {dtype}: the fused decoder runs float32, bfloat16 and float16"
    if not 16 <= dim <= MAX_FEATURES:
        return f"D={dim}: the fused decoder keeps a session's rows of 16..{MAX_FEATURES} features in registers"
    if num_heads * head_dim != dim:
        return f"heads x head_dim = {num_heads} x {head_dim} != D={dim}"
    if not (16 <= head_dim <= 64 and head_dim & (head_dim - 1) == 0):
        return f"head_dim={head_dim}: expected a power of two in 16..64"
    if hidden % FF_CHUNK:
        return f"feed-forward width {hidden}: expected a multiple of {FF_CHUNK}"
    return None


def _norm_args(n: NormParams | None, like: Tensor) -> tuple[Tensor, Tensor, float, bool, bool, bool, bool]:
    """Kernel arguments of an optional norm: weight, bias (``like`` for absent ones), eps and the flags NORM, RMS,
    HAS_W, HAS_B."""
    if n is None:
        return like, like, 0.0, False, False, False, False
    w = n.weight if n.weight is not None else like
    b = n.bias if n.bias is not None and not n.rms else like
    return w, b, n.eps, True, n.rms, n.weight is not None, n.bias is not None and not n.rms


def _stream_args(stream: Stream, x_out: Tensor) -> tuple[object, ...]:
    base = stream.base
    parts = stream.parts if stream.parts is not None else base
    num_parts = 0 if stream.parts is None else stream.parts.shape[0]
    sw, sb, s_eps, s_norm, s_rms, s_w, s_b = _norm_args(stream.store_norm, base)
    hw, hb, h_eps, h_norm, h_rms, h_w, h_b = _norm_args(stream.h_norm, base)
    bias = stream.bias if stream.bias is not None else base
    return (base, parts, num_parts, bias, stream.bias is not None, sw, sb, s_eps, s_norm, s_rms, s_w, s_b) + (
        hw,
        hb,
        h_eps,
        h_norm,
        h_rms,
        h_w,
        h_b,
        x_out,
    )


def _check_stream(stream: Stream) -> tuple[int, int, int]:
    b, t, d = stream.base.shape
    if not stream.base.is_contiguous() or (stream.parts is not None and not stream.parts.is_contiguous()):
        raise ValueError("Stream: base and parts must be contiguous")
    if t > MAX_TOKENS:
        raise ValueError(f"Stream: {t} tokens per session, the fused decoder takes <= {MAX_TOKENS}")
    return b, t, d


def _blocks(t: int, d: int) -> dict[str, int]:
    return {"BLOCK_T": max(16, triton.next_power_of_2(t)), "BLOCK_D": max(16, triton.next_power_of_2(d))}


def _slot(blocks: dict[str, int], width: int) -> int:
    return blocks["BLOCK_T"] * width


def scratch(
    batch: int, tokens: int, dim: int, num_heads: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """One scratch buffer that every block of a decoder call of this shape can use (the blocks run one after the
    other): per program a row block of the products' left operand, in the weights' ``dtype``."""
    blocks = _blocks(tokens, dim)
    size = batch * max(
        num_heads * _slot(blocks, blocks["BLOCK_D"]),
        hidden // FF_CHUNK * _slot(blocks, max(blocks["BLOCK_D"], FF_CHUNK)),
    )
    return torch.empty(size, dtype=dtype, device=device)


def _scratch(given: Tensor | None, programs: int, slot: int, like: Tensor) -> Tensor:
    if given is None:
        return torch.empty(programs * slot, dtype=like.dtype, device=like.device)
    if given.numel() < programs * slot or given.dtype != like.dtype:
        raise ValueError(
            f"scratch: expected >= {programs * slot} elements of {like.dtype}, got {given.numel()} of {given.dtype}"
        )
    return given


def attention_block(
    stream: Stream,
    weight: Tensor,
    bias: Tensor | None,
    out_weight: Tensor,
    num_heads: int,
    x_out: Tensor,
    parts_out: Tensor,
    *,
    offset: Tensor | None = None,
    memory: tuple[Tensor, Tensor] | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    scratch: Tensor | None = None,
) -> None:
    """One attention sub-layer of ``b`` sessions of ``T`` tokens, one program per (session, head).

    Self-attention (``memory=None``): ``weight (3 D, D)``, ``bias (3 D,)`` the fused q/k/v projection; keys are the
    session's own tokens (``causal``: token ``t`` sees ``<= t``). Cross-attention: ``weight (D, D)`` the query
    projection, ``memory = (k, v)`` each ``(b, H, S, hd)`` (keys already in the queries' frame, last dim contiguous),
    ``mask`` additive ``(b, 1 | H, 1, S)`` (last dim contiguous) or ``None``. ``offset (b, 1, H, hd)``: added to
    queries (and self-attention keys), :meth:`~streamtx.nn.lowered.Positional.query_offset`.

    Writes the stream ``x_out (b, T, D)`` (float32) and this sub-layer's output projection without its bias, one
    partial sum per head, ``parts_out (H, b, T, D)`` (float32): ``out(attn(h)) = parts_out.sum(0) + b_out``.
    ``scratch``: a buffer from :func:`scratch` (``None``: one of this call's own)."""
    b, t, d = _check_stream(stream)
    hd = d // num_heads
    mk_strides: tuple[int, ...]
    mv_strides: tuple[int, ...]
    if memory is None:
        mk = mv = stream.base
        mk_strides = mv_strides = (0, 0, 0)
        keys = t
    else:
        mk, mv = memory
        if mk.stride(-1) != 1 or mv.stride(-1) != 1:
            raise ValueError("attention_block: memory keys and values need a contiguous last dimension")
        mk_strides, mv_strides = mk.stride()[:3], mv.stride()[:3]
        keys = mk.shape[2]
        if keys > MAX_KEYS:
            raise ValueError(f"attention_block: {keys} memory slots, the fused decoder takes <= {MAX_KEYS}")
    if mask is None:
        mask_arg, mask_strides = stream.base, (0, 0)
    else:
        if mask.stride(-1) != 1 or mask.shape[2] != 1:
            raise ValueError("attention_block: expected a mask (b, 1 | H, 1, S) with a contiguous last dimension")
        mask_arg, mask_strides = mask, (mask.stride(0), mask.stride(1) * (mask.shape[1] > 1))
    off, off_strides = (stream.base, (0, 0)) if offset is None else (offset, (offset.stride(0), offset.stride(2)))
    blocks = _blocks(t, d)
    slot = _slot(blocks, blocks["BLOCK_D"])
    scratch = _scratch(scratch, b * num_heads, slot, weight)
    _attention_block_kernel[(b, num_heads)](
        *_stream_args(stream, x_out),
        weight,
        bias if bias is not None else weight,
        off,
        *off_strides,
        mk,
        mv,
        *mk_strides,
        *mv_strides,
        mask_arg,
        *mask_strides,
        out_weight,
        parts_out,
        scratch,
        t,
        keys,
        d,
        hd**-0.5,
        HAS_QBIAS=bias is not None,
        HAS_OFFSET=offset is not None,
        HAS_MASK=mask is not None,
        CROSS=memory is not None,
        CAUSAL=causal,
        HEAD_DIM=hd,
        BLOCK_S=max(16, triton.next_power_of_2(keys)),
        K_CHUNK=K_CHUNK,
        SLOT=slot,
        num_warps=NUM_WARPS,
        **blocks,
    )


def feedforward_block(
    stream: Stream,
    fc1: tuple[Tensor, Tensor | None],
    fc2_weight: Tensor,
    activation: Callable[[Tensor], Tensor],
    x_out: Tensor,
    parts_out: Tensor,
    *,
    scratch: Tensor | None = None,
) -> None:
    """The feed-forward sub-layer ``act(h W_1^T + b_1) W_2^T`` of ``b`` sessions, one program per (session, chunk of
    :data:`FF_CHUNK` hidden units): ``fc1 = (W_1 (F, D), b_1 (F,) | None)``, ``fc2_weight (D, F)``. Writes the
    stream ``x_out (b, T, D)`` and one partial sum per chunk, ``parts_out (F / FF_CHUNK, b, T, D)``, without
    ``fc2``'s bias (float32). ``scratch``: as :func:`attention_block` takes it."""
    b, t, d = _check_stream(stream)
    w1, b1 = fc1
    hidden = w1.shape[0]
    blocks = _blocks(t, d)
    slot = _slot(blocks, max(blocks["BLOCK_D"], FF_CHUNK))
    scratch = _scratch(scratch, b * (hidden // FF_CHUNK), slot, w1)
    _feedforward_block_kernel[(b, hidden // FF_CHUNK)](
        *_stream_args(stream, x_out),
        w1,
        b1 if b1 is not None else w1,
        fc2_weight,
        parts_out,
        scratch,
        t,
        d,
        hidden,
        HAS_B1=b1 is not None,
        ACTIVATION=ACTIVATIONS[activation],
        CHUNK=FF_CHUNK,
        K_CHUNK=K_CHUNK,
        SLOT=slot,
        num_warps=NUM_WARPS,
        **blocks,
    )


def residual_stream(stream: Stream, x_out: Tensor, h_out: Tensor) -> None:
    """The stream alone: ``x_out`` as the blocks write it and ``h_out = h_norm(x)`` in ``h_out``'s dtype (both
    ``(b, T, D)``), one program per session."""
    b, t, d = _check_stream(stream)
    _stream_kernel[(b,)](*_stream_args(stream, x_out), h_out, t, d, num_warps=NUM_WARPS, **_blocks(t, d))


if triton is not None:

    @triton.jit
    def _norm_rows(
        x, w_ptr, b_ptr, cols, num_features, eps, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr
    ):
        """LayerNorm / RMSNorm of the rows of ``x (BLOCK_T, BLOCK_D)`` (float32, zeros beyond ``num_features``)."""
        inside = cols < num_features
        if RMS:
            centered = x
        else:
            centered = tl.where(inside[None, :], x - (tl.sum(x, axis=1) / num_features)[:, None], 0.0)
        y = centered * tl.rsqrt(tl.sum(centered * centered, axis=1) / num_features + eps)[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)[None, :]
        return y

    @triton.jit
    def _stream_in(
        base_ptr,
        parts_ptr,
        NUM_PARTS: tl.constexpr,
        pbias_ptr,
        sw_ptr,
        sb_ptr,
        s_eps,
        hw_ptr,
        hb_ptr,
        h_eps,
        x_out_ptr,
        session,
        store,
        num_tokens,
        num_features,
        HAS_PBIAS: tl.constexpr,
        S_NORM: tl.constexpr,
        S_RMS: tl.constexpr,
        S_W: tl.constexpr,
        S_B: tl.constexpr,
        H_NORM: tl.constexpr,
        H_RMS: tl.constexpr,
        H_W: tl.constexpr,
        H_B: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """The session's residual stream (see :class:`Stream`): returns ``(x, h)``, float32 ``(BLOCK_T, BLOCK_D)``,
        zeros outside; stores ``x`` where ``store``."""
        t = tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        inside = (t[:, None] < num_tokens) & (cols[None, :] < num_features)
        per_session = num_tokens * num_features
        offs = session * per_session + t[:, None] * num_features + cols[None, :]
        x = tl.load(base_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        part_stride = tl.num_programs(0).to(tl.int64) * per_session  # parts are (P, b, T, D)
        for p in tl.static_range(NUM_PARTS):
            x += tl.load(parts_ptr + p * part_stride + offs, mask=inside, other=0.0).to(tl.float32)
        if HAS_PBIAS:
            x += tl.load(pbias_ptr + cols, mask=cols < num_features, other=0.0).to(tl.float32)[None, :]
        if S_NORM:
            x = tl.where(inside, _norm_rows(x, sw_ptr, sb_ptr, cols, num_features, s_eps, S_RMS, S_W, S_B), 0.0)
        tl.store(x_out_ptr + offs, x, mask=inside & store)
        h = x
        if H_NORM:
            h = tl.where(inside, _norm_rows(x, hw_ptr, hb_ptr, cols, num_features, h_eps, H_RMS, H_W, H_B), 0.0)
        return x, h

    @triton.jit
    def _spill(a, scratch_ptr, SLOT: tl.constexpr, BLOCK_T: tl.constexpr, WIDTH: tl.constexpr):
        """Write ``a (BLOCK_T, WIDTH)`` to this program's scratch (``SLOT`` elements per program) and return its
        pointer: products read their left operand back in chunks along K (a float32 product on CUDA cores holds
        each thread's K-extent of both operands in registers; chunks keep that to ``K_CHUNK``). The caller puts a
        barrier between the last read of the previous contents and this write."""
        program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        ptr = scratch_ptr + program.to(tl.int64) * SLOT
        t = tl.arange(0, BLOCK_T)
        tl.store(ptr + t[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :], a)
        tl.debug_barrier()  # the program's threads read each other's rows
        return ptr

    @triton.jit
    def _project(
        a_ptr,
        w_ptr,
        rows,
        k_offset,
        ld_w,
        k_size,
        BLOCK_T: tl.constexpr,
        WIDTH: tl.constexpr,
        N: tl.constexpr,
        K_CHUNK: tl.constexpr,
    ):
        """``A @ W[rows, k_offset : k_offset + k_size]^T`` for ``A (BLOCK_T, WIDTH)`` at ``a_ptr`` (:func:`_spill`;
        columns past ``k_size`` are zeros) and a row-major ``W`` of row stride ``ld_w``: ``(BLOCK_T, N)`` float32
        (exact products for float32 operands)."""
        t = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, N), dtype=tl.float32)
        for k0 in range(0, WIDTH, K_CHUNK):
            kk = k0 + tl.arange(0, K_CHUNK)
            a = tl.load(a_ptr + t[:, None] * WIDTH + kk[None, :], cache_modifier=".cg")
            w = tl.load(w_ptr + rows[None, :] * ld_w + (k_offset + kk)[:, None], mask=kk[:, None] < k_size, other=0.0)
            acc += tl.dot(a, w, input_precision="ieee")
        return acc

    @triton.jit
    def _attention_block_kernel(
        base_ptr,
        parts_ptr,
        NUM_PARTS: tl.constexpr,
        pbias_ptr,
        HAS_PBIAS: tl.constexpr,
        sw_ptr,
        sb_ptr,
        s_eps,
        S_NORM: tl.constexpr,
        S_RMS: tl.constexpr,
        S_W: tl.constexpr,
        S_B: tl.constexpr,
        hw_ptr,
        hb_ptr,
        h_eps,
        H_NORM: tl.constexpr,
        H_RMS: tl.constexpr,
        H_W: tl.constexpr,
        H_B: tl.constexpr,
        x_out_ptr,
        w_ptr,
        qb_ptr,
        off_ptr,
        so_b,
        so_h,
        mk_ptr,
        mv_ptr,
        smk_b,
        smk_h,
        smk_s,
        smv_b,
        smv_h,
        smv_s,
        mask_ptr,
        sm_b,
        sm_h,
        wo_ptr,
        out_ptr,
        scratch_ptr,
        num_tokens,
        num_keys,
        num_features,
        scale,
        HAS_QBIAS: tl.constexpr,
        HAS_OFFSET: tl.constexpr,
        HAS_MASK: tl.constexpr,
        CROSS: tl.constexpr,
        CAUSAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,
        K_CHUNK: tl.constexpr,
        SLOT: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        session = tl.program_id(0)
        head = tl.program_id(1)
        x, h = _stream_in(
            base_ptr,
            parts_ptr,
            NUM_PARTS,
            pbias_ptr,
            sw_ptr,
            sb_ptr,
            s_eps,
            hw_ptr,
            hb_ptr,
            h_eps,
            x_out_ptr,
            session,
            head == 0,
            num_tokens,
            num_features,
            HAS_PBIAS,
            S_NORM,
            S_RMS,
            S_W,
            S_B,
            H_NORM,
            H_RMS,
            H_W,
            H_B,
            BLOCK_T,
            BLOCK_D,
        )
        dt = w_ptr.dtype.element_ty
        a = _spill(h.to(dt), scratch_ptr, SLOT, BLOCK_T, BLOCK_D)
        t = tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        d = tl.arange(0, HEAD_DIM)
        rows = head * HEAD_DIM + d
        q = _project(a, w_ptr, rows, 0, num_features, num_features, BLOCK_T, BLOCK_D, HEAD_DIM, K_CHUNK)
        if HAS_QBIAS:
            q += tl.load(qb_ptr + rows).to(tl.float32)[None, :]
        if HAS_OFFSET:
            offset = tl.load(off_ptr + session * so_b + head * so_h + d).to(tl.float32)[None, :]
            q += offset
        if CROSS:
            s = tl.arange(0, BLOCK_S)
            present = s[:, None] < num_keys
            k = tl.load(
                mk_ptr + session * smk_b + head * smk_h + s[:, None] * smk_s + d[None, :], mask=present, other=0.0
            )
            v = tl.load(
                mv_ptr + session * smv_b + head * smv_h + s[:, None] * smv_s + d[None, :], mask=present, other=0.0
            )
        else:
            s = tl.arange(0, BLOCK_T)
            k = _project(
                a, w_ptr, num_features + rows, 0, num_features, num_features, BLOCK_T, BLOCK_D, HEAD_DIM, K_CHUNK
            )
            v = _project(
                a, w_ptr, 2 * num_features + rows, 0, num_features, num_features, BLOCK_T, BLOCK_D, HEAD_DIM, K_CHUNK
            )
            if HAS_QBIAS:
                k += tl.load(qb_ptr + num_features + rows).to(tl.float32)[None, :]
                v += tl.load(qb_ptr + 2 * num_features + rows).to(tl.float32)[None, :]
            if HAS_OFFSET:
                k += offset
            k = k.to(dt)
            v = v.to(dt)
        scores = tl.dot(q.to(dt), tl.trans(k), input_precision="ieee") * scale  # (BLOCK_T, BLOCK_S), float32
        visible = (s[None, :] < num_keys) & (t[:, None] >= 0)
        if CAUSAL:
            visible = visible & (s[None, :] <= t[:, None])
        if HAS_MASK:
            bias = tl.load(mask_ptr + session * sm_b + head * sm_h + s, mask=s < num_keys, other=0.0)
            scores += bias.to(tl.float32)[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        o = tl.dot(p.to(dt), v, input_precision="ieee") / tl.sum(p, axis=1)[:, None]  # (BLOCK_T, HEAD_DIM)
        # this head's share of the output projection: o_h @ W_o[:, head]^T, W_o (D, D) row-major
        tl.debug_barrier()  # every thread has read its chunks of h: o may overwrite them
        a = _spill(o.to(dt), scratch_ptr, SLOT, BLOCK_T, HEAD_DIM)
        features = tl.where(cols < num_features, cols, 0)
        part = _project(
            a, wo_ptr, features, head * HEAD_DIM, num_features, HEAD_DIM, BLOCK_T, HEAD_DIM, BLOCK_D, K_CHUNK
        )
        per_session = num_tokens * num_features
        offs = (
            (head * tl.num_programs(0) + session).to(tl.int64) * per_session + t[:, None] * num_features + cols[None, :]
        )
        tl.store(out_ptr + offs, part, mask=(t[:, None] < num_tokens) & (cols[None, :] < num_features))

    @triton.jit
    def _feedforward_block_kernel(
        base_ptr,
        parts_ptr,
        NUM_PARTS: tl.constexpr,
        pbias_ptr,
        HAS_PBIAS: tl.constexpr,
        sw_ptr,
        sb_ptr,
        s_eps,
        S_NORM: tl.constexpr,
        S_RMS: tl.constexpr,
        S_W: tl.constexpr,
        S_B: tl.constexpr,
        hw_ptr,
        hb_ptr,
        h_eps,
        H_NORM: tl.constexpr,
        H_RMS: tl.constexpr,
        H_W: tl.constexpr,
        H_B: tl.constexpr,
        x_out_ptr,
        w1_ptr,
        b1_ptr,
        w2_ptr,
        out_ptr,
        scratch_ptr,
        num_tokens,
        num_features,
        hidden,
        HAS_B1: tl.constexpr,
        ACTIVATION: tl.constexpr,
        CHUNK: tl.constexpr,
        K_CHUNK: tl.constexpr,
        SLOT: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        session = tl.program_id(0)
        chunk = tl.program_id(1)
        x, h = _stream_in(
            base_ptr,
            parts_ptr,
            NUM_PARTS,
            pbias_ptr,
            sw_ptr,
            sb_ptr,
            s_eps,
            hw_ptr,
            hb_ptr,
            h_eps,
            x_out_ptr,
            session,
            chunk == 0,
            num_tokens,
            num_features,
            HAS_PBIAS,
            S_NORM,
            S_RMS,
            S_W,
            S_B,
            H_NORM,
            H_RMS,
            H_W,
            H_B,
            BLOCK_T,
            BLOCK_D,
        )
        dt = w1_ptr.dtype.element_ty
        t = tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        units = chunk * CHUNK + tl.arange(0, CHUNK)
        a = _spill(h.to(dt), scratch_ptr, SLOT, BLOCK_T, BLOCK_D)
        z = _project(a, w1_ptr, units, 0, num_features, num_features, BLOCK_T, BLOCK_D, CHUNK, K_CHUNK)
        if HAS_B1:
            z += tl.load(b1_ptr + units).to(tl.float32)[None, :]
        z = z.to(dt).to(tl.float32)  # the hidden activation in the compute dtype, as the torch path stores it
        if ACTIVATION == 0:
            z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        elif ACTIVATION == 1:
            z = tl.maximum(z, 0.0)
        else:
            z = z / (1.0 + tl.exp(-z))
        tl.debug_barrier()  # every thread has read its chunks of the scratch rows: z may overwrite them
        a = _spill(z.to(dt), scratch_ptr, SLOT, BLOCK_T, CHUNK)
        # W_2 (D, F) row-major: output feature n reads W_2[n, chunk]; padded features are masked rows of W_2
        rows = tl.where(cols < num_features, cols, 0)
        part = _project(a, w2_ptr, rows, chunk * CHUNK, hidden, CHUNK, BLOCK_T, CHUNK, BLOCK_D, K_CHUNK)
        per_session = num_tokens * num_features
        offs = (
            (chunk * tl.num_programs(0) + session).to(tl.int64) * per_session
            + t[:, None] * num_features
            + cols[None, :]
        )
        tl.store(out_ptr + offs, part, mask=(t[:, None] < num_tokens) & (cols[None, :] < num_features))

    @triton.jit
    def _stream_kernel(
        base_ptr,
        parts_ptr,
        NUM_PARTS: tl.constexpr,
        pbias_ptr,
        HAS_PBIAS: tl.constexpr,
        sw_ptr,
        sb_ptr,
        s_eps,
        S_NORM: tl.constexpr,
        S_RMS: tl.constexpr,
        S_W: tl.constexpr,
        S_B: tl.constexpr,
        hw_ptr,
        hb_ptr,
        h_eps,
        H_NORM: tl.constexpr,
        H_RMS: tl.constexpr,
        H_W: tl.constexpr,
        H_B: tl.constexpr,
        x_out_ptr,
        h_out_ptr,
        num_tokens,
        num_features,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        session = tl.program_id(0)
        x, h = _stream_in(
            base_ptr,
            parts_ptr,
            NUM_PARTS,
            pbias_ptr,
            sw_ptr,
            sb_ptr,
            s_eps,
            hw_ptr,
            hb_ptr,
            h_eps,
            x_out_ptr,
            session,
            True,
            num_tokens,
            num_features,
            HAS_PBIAS,
            S_NORM,
            S_RMS,
            S_W,
            S_B,
            H_NORM,
            H_RMS,
            H_W,
            H_B,
            BLOCK_T,
            BLOCK_D,
        )
        t = tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        offs = session * num_tokens * num_features + t[:, None] * num_features + cols[None, :]
        inside = (t[:, None] < num_tokens) & (cols[None, :] < num_features)
        tl.store(h_out_ptr + offs, h.to(h_out_ptr.dtype.element_ty), mask=inside)
