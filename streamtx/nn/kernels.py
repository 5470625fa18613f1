"""The kernels of the lowered blocks (:mod:`streamtx.nn.lowered`): fused GPU kernels for the static plan's hot loop,
with plain-torch equivalents.

A denoiser evaluation of a small policy is ~70 kernels that each do a few microseconds of work; on an H100 inside a
CUDA graph two kinds dominate (measured, benchmarks/GPU_NOTES.md): attention of Tx action tokens over a few dozen keys
(the fp32 memory-efficient kernel takes ~8 us for it) and residual add + LayerNorm pairs. Two Triton kernels replace
them, one program per (batch, head) or per row:

* :func:`attention`: ``softmax(q k^T / sqrt(hd) + mask) v`` of a whole head in registers (exact fp32 products);
* :func:`add_norm`: ``x + y`` and its LayerNorm / RMSNorm in one pass.

Without Triton or off CUDA (and for shapes outside the kernels' limits) the torch path runs: the same math through
``scaled_dot_product_attention`` and ``layer_norm``/``rms_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch paths run
    triton = None

__all__ = ["fused_kernels_available", "attention", "add_norm", "norm"]

_MAX_TOKENS, _MAX_KEYS, _MAX_HEAD_DIM, _MAX_FEATURES = 64, 256, 256, 8192


def fused_kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``."""
    return triton is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool) -> Tensor:
    """LayerNorm (or RMSNorm) over the last dimension."""
    if rms:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, fused: bool = False
) -> Tensor:
    """Multi-head attention ``q (b, H, T, hd)`` over ``k, v (b, H, S, hd)`` -> ``(b, T, H * hd)``, heads merged.

    ``mask``: additive, broadcastable to ``(b, H, T, S)``; ``causal``: query ``t`` sees keys ``<= t``. Any strides
    with a contiguous last dimension. ``fused`` runs the Triton kernel on CUDA where the shapes allow it, which takes
    masks that are the same for every query: per key ``(b, 1, 1, S)`` or per head and key ``(b, H, 1, S)``.
    """
    b, h, t, hd = q.shape
    s = k.shape[2]
    if not (
        fused
        and q.is_cuda
        and t <= _MAX_TOKENS
        and s <= _MAX_KEYS
        and 16 <= hd <= _MAX_HEAD_DIM
        and hd & (hd - 1) == 0
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and (mask is None or (mask.shape[2] == 1 and mask.stride(-1) == 1))
    ):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return out.transpose(1, 2).reshape(b, t, h * hd)
    out = torch.empty(b, t, h, hd, dtype=q.dtype, device=q.device)
    mask_arg, mask_strides = (
        (q, (0, 0)) if mask is None else (mask, (mask.stride(0), mask.stride(1) * (mask.shape[1] > 1)))
    )
    _attention_kernel[(b * h,)](
        q,
        k,
        v,
        mask_arg,
        out,
        h,
        t,
        s,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *mask_strides,
        *out.stride()[:3],
        hd**-0.5,
        HAS_MASK=mask is not None,
        CAUSAL=causal,
        BLOCK_T=max(16, triton.next_power_of_2(t)),
        BLOCK_S=max(16, triton.next_power_of_2(s)),
        HEAD_DIM=hd,
        num_warps=4 if hd <= 64 else 8,
    )
    return out.view(b, t, h * hd)


def add_norm(
    x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, fused: bool = False
) -> tuple[Tensor, Tensor]:
    """The residual update ``x + y`` and its norm over the last dimension, ``(x + y, norm(x + y))`` (``fused``: one
    Triton kernel on CUDA)."""
    d = x.shape[-1]
    if not (fused and x.is_cuda and d <= _MAX_FEATURES and x.is_contiguous() and y.is_contiguous()):
        x = x + y
        return x, norm(x, weight, bias, eps, rms)
    new, normed = torch.empty_like(x), torch.empty_like(x)
    _add_norm_kernel[(x.numel() // d,)](
        x,
        y,
        new,
        normed,
        weight if weight is not None else x,
        bias if bias is not None else x,
        d,
        eps,
        RMS=rms,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None and not rms,
        BLOCK=triton.next_power_of_2(d),
        num_warps=1 if d <= 256 else 4,
    )
    return new, normed


if triton is not None:

    @triton.jit
    def _attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        out_ptr,
        num_heads,
        num_q,
        num_k,
        sq_b,
        sq_h,
        sq_t,
        sk_b,
        sk_h,
        sk_s,
        sv_b,
        sv_h,
        sv_s,
        sm_b,
        sm_h,
        so_b,
        so_t,
        so_h,
        scale,
        HAS_MASK: tl.constexpr,
        CAUSAL: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_S: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b, h = pid // num_heads, pid % num_heads
        t = tl.arange(0, BLOCK_T)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + d[None, :], mask=t[:, None] < num_q, other=0.0)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + s[:, None] * sk_s + d[None, :], mask=s[:, None] < num_k, other=0.0)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + s[:, None] * sv_s + d[None, :], mask=s[:, None] < num_k, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_T, BLOCK_S), fp32
        visible = (s[None, :] < num_k) & (t[:, None] >= 0)
        if CAUSAL:
            visible = visible & (s[None, :] <= t[:, None])
        if HAS_MASK:
            scores += tl.load(mask_ptr + b * sm_b + h * sm_h + s, mask=s < num_k, other=0.0).to(tl.float32)[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        out = tl.dot(p.to(v.dtype), v, input_precision="ieee") / tl.sum(p, axis=1)[:, None]
        tl.store(
            out_ptr + b * so_b + t[:, None] * so_t + h * so_h + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=t[:, None] < num_q,
        )

    @triton.jit
    def _add_norm_kernel(
        x_ptr,
        y_ptr,
        new_ptr,
        normed_ptr,
        w_ptr,
        b_ptr,
        num_features,
        eps,
        RMS: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64) * num_features
        cols = tl.arange(0, BLOCK)
        inside = cols < num_features
        x = tl.load(x_ptr + row + cols, mask=inside, other=0.0) + tl.load(y_ptr + row + cols, mask=inside, other=0.0)
        tl.store(new_ptr + row + cols, x, mask=inside)
        x = x.to(tl.float32)  # statistics of the stored (rounded) sum, as the unfused path computes them
        if RMS:
            centered = x
        else:
            centered = tl.where(inside, x - tl.sum(x, axis=0) / num_features, 0.0)
        y = centered * tl.rsqrt(tl.sum(centered * centered, axis=0) / num_features + eps)
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(normed_ptr + row + cols, y.to(normed_ptr.dtype.element_ty), mask=inside)
