"""The chunked scans of the selective SSM, in PyTorch: the SSD scan (Mamba-2) and the diagonal one (docs/design.md 3.3).

Dao & Gu 2024, "Transformers are SSMs" (state-space duality, arXiv 2405.21060). Per head h, with a scalar decay
``A_h < 0`` and a data-dependent step ``dt_t > 0``, the state ``S`` (headdim x d_state) follows

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T,        y_t = S_t C_t.

The diagonal scan keeps one scalar state per channel, ``s_t = alpha_t s_{t-1} + B_t u_t``, ``y_t = C_t s_t``
(the Hydra paper's own equation, arXiv 2508.15099).

Both split the sequence into chunks of ``chunk_size``: inside a chunk the output is one causal (chunk x chunk)
matrix product, across chunks only the states are carried. Nothing of size L x L exists and there is no Python
loop over time. Both take an initial state and return the final one, so a sequence may be processed in pieces.

Both also take ``resets`` (b, L) bool, the document starts of a packed window (what mamba-ssm's ``seq_idx`` says):
at a start the decay of the state before it is 0, so the output from there on is that of the document alone. The
chunked form keeps this exact with masks, never with an infinite log decay (which the factored decay could not
hold): inside a chunk only token pairs of one document mix, a chunk's local state takes only its last document's
tokens, the state entering a chunk reaches only the tokens before the chunk's first start, and it passes a chunk
that contains a start not at all.
These are the references: :func:`hydra_kit.ops.mamba_ssd.mamba_ssd_scan` (mamba-ssm's fused Triton kernels, on
a GPU) computes what :func:`ssd_chunked_scan` does, and is tested against it. The SSD scan's pass across chunks is
:func:`hydra_kit.ops.chunk_carry.chunk_carry`, one C pass on CPU in float32 (its PyTorch reference elsewhere).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hydra_kit.ops.chunk_carry import carry_states, chunk_carry

__all__ = ["diagonal_chunked_scan", "ssd_chunked_scan"]


def _half_range(dtype: torch.dtype) -> float:
    """Largest |exponent| we let a factored decay take: exp of it times a sum of products stays finite."""
    return math.log(torch.finfo(dtype).max) - 25.0  # 63.7 in float32, 684 in float64


def _pad_time(t: Tensor, pad: int) -> Tensor:
    """Append ``pad`` zero steps along dim 1 (zero step size means: no decay and no input, the state is kept)."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)


def _split_chunks(chunk_size: int, *ts: Tensor) -> tuple[int, int, list[Tensor]]:
    """Chunk length l (at most the sequence length), chunk count c and the inputs padded along dim 1 to c * l."""
    seq_len = ts[0].shape[1]
    ell = min(chunk_size, seq_len)
    pad = (-seq_len) % ell
    return ell, (seq_len + pad) // ell, [_pad_time(t, pad) for t in ts]


def _chunk_resets(resets: Tensor, b: int, c: int, ell: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The masks of a chunked scan with document starts (see the module docstring).

    Args:
        resets: (b, c * l) bool document starts, already padded to whole chunks.

    Returns:
        same: (b, c, l, l) bool, tokens t and s of a chunk lie in one document;
        in_last: (b, c, l) bool, token s lies in its chunk's last document (it reaches the chunk's end state);
        fresh: (b, c, l) bool, no start in the chunk at or before t (the entering state reaches t);
        passes: (b, c) bool, the chunk has no start (the entering state passes through it).
    """
    doc = resets.view(b, c, ell).cumsum(2)  # (b, c, l) index of each token's document within its chunk
    same = doc[..., :, None] == doc[..., None, :]
    return same, doc == doc[..., -1:], doc == 0, doc[..., -1] == 0


def ssd_chunked_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba-2): S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t (no D skip).

    Args:
        x: (b, L, H, P) inputs per head.
        dt: (b, L, H) positive step sizes.
        A: (H,) negative decay rates.
        B, C: (b, L, G, N) input and output projections; head h uses group h // (H / G).
        chunk_size: tokens per chunk; L need not be a multiple (the tail is padded with zero steps).
        initial_state: (b, H, P, N) state before the first token, or None for zeros.
        resets: (b, L) bool document starts, or None: at a start the state before it is dropped (S_{t-1} = 0).

    Returns:
        y: (b, L, H, P); final_state: (b, H, P, N) (that of the last document).
    """
    b, seq_len, H, P = x.shape
    G, N = B.shape[-2:]
    Hg = H // G
    if initial_state is None:
        initial_state = x.new_zeros(b, H, P, N)
    if seq_len == 0:
        return x.new_zeros(x.shape), initial_state
    ell, c, (x, dt, B, C) = _split_chunks(chunk_size, x, dt, B, C)
    masks = None if resets is None else _chunk_resets(_split_chunks(chunk_size, resets)[2][0], b, c, ell)

    acum = (dt * A).view(b, c, ell, H).cumsum(2)  # (b, c, l, H) log decay from the chunk start through t
    last = acum[:, :, -1]  # (b, c, H) log decay of the whole chunk
    Bc = B.view(b, c, ell, G, N).transpose(2, 3)  # (b, c, G, l, N)
    Cc = C.view(b, c, ell, G, N).transpose(2, 3)
    CB = Cc @ Bc.transpose(-1, -2)  # (b, c, G, l, l): shared by the Hg heads of a group
    chunk_decay = last.exp()  # (b, c, H)
    if masks is not None:
        CB = CB * masks[0][:, :, None]  # only pairs of one document mix inside a chunk
        chunk_decay = chunk_decay * masks[3][..., None]

    def by_group(t: Tensor) -> Tensor:  # (b, c, l, H, P) -> (b, c, G, l, Hg*P), a view when G == 1
        return t.reshape(b, c, ell, G, Hg * P).transpose(2, 3)

    def by_head(t: Tensor) -> Tensor:  # inverse of by_group
        return t.transpose(2, 3).reshape(b, c, ell, H, P)

    # Within a chunk, exp(acum_t - acum_s) = exp(acum_t - m) * exp(m - acum_s) for any m: with m half the chunk's
    # decay, both factors stay within exp(+-range/2), so when that fits the float type, the per-head decay moves
    # onto x and y and all heads of a group share ONE causal (l x l) @ (l x Hg*P) product. Otherwise (a chunk
    # decaying by more than ~exp(-127) in float32) fall back to exact per-head decay matrices.
    factored = bool((-last).max() <= 2 * _half_range(x.dtype)) if last.numel() else True
    if factored:
        m = (0.5 * last).detach()[:, :, None]  # (b, c, 1, H); the result does not depend on m
        # dt and the decay folded into one small (b, c, l, H) factor: one pass over x instead of two.
        xm = x.view(b, c, ell, H, P) * (dt.view(b, c, ell, H) * (m - acum).exp())[..., None]  # (b, c, l, H, P)
        ydiag = CB.tril() @ by_group(xm)  # (b, c, G, l, Hg*P), still to be scaled by exp(acum - m)
        if masks is not None:
            xm = xm * masks[1][..., None, None]  # only the chunk's last document builds its end state
        local = (Bc.transpose(-1, -2) @ by_group(xm)).view(b, c, G, N, Hg, P)  # still to be scaled by exp(last - m)
        # The carry applies both factors: exp(last - m) to each chunk's own state, exp(m) to each entering state.
        scale_in, scale_out = (last - m[:, :, 0]).exp(), m[:, :, 0].exp()  # (b, c, H)
    else:
        xdt = (x * dt[..., None]).view(b, c, ell, H, P)
        seg = acum.transpose(2, 3)[..., :, None] - acum.transpose(2, 3)[..., None, :]  # (b, c, H, l, l)
        causal = torch.ones(ell, ell, dtype=torch.bool, device=x.device).tril()
        decay = seg.masked_fill(~causal, -math.inf).exp()  # CB is already masked by document
        mix = decay.view(b, c, G, Hg, ell, ell) * CB[:, :, :, None]  # (b, c, G, Hg, l, l)
        ydiag = mix.view(b, c, H, ell, ell) @ xdt.transpose(2, 3)  # (b, c, H, l, P)
        xe = xdt * (last[:, :, None] - acum).exp()[..., None]  # decay from t to the chunk end
        if masks is not None:
            xe = xe * masks[1][..., None, None]
        local = (Bc.transpose(-1, -2) @ by_group(xe)).view(b, c, G, N, Hg, P)
        scale_in = scale_out = torch.ones_like(chunk_decay)

    init = initial_state.view(b, G, Hg, P, N).permute(0, 1, 4, 2, 3).contiguous()  # (b, G, N, Hg, P)
    starts, final = chunk_carry(local, scale_in, chunk_decay, scale_out, init)  # (b, c, G, N, Hg, P), (b, G, N, Hg, P)
    final_state = final.permute(0, 1, 3, 4, 2).reshape(b, H, P, N).contiguous()  # what the C decoding step reads

    if factored:
        if masks is None:  # ydiag + C @ starts as one accumulating product: no (b, c, G, l, Hg*P) temporary
            flat = (b * c * G, ell, Hg * P)
            ys = ydiag.view(flat).baddbmm_(Cc.reshape(b * c * G, ell, N), starts.view(b * c * G, N, Hg * P)).view_as(ydiag)
        else:
            yoff = (Cc @ starts.view(b, c, G, N, Hg * P)) * masks[2][:, :, None, :, None]  # reaches t only before a start
            ys = ydiag + yoff
        y = by_head(ys) * (acum - m).exp()[..., None]
    else:
        yoff = by_head(Cc @ starts.view(b, c, G, N, Hg * P)) * acum.exp()[..., None]
        if masks is not None:
            yoff = yoff * masks[2][..., None, None]
        y = ydiag.transpose(2, 3) + yoff
    return y.reshape(b, c * ell, H, P)[:, :seq_len], final_state


def _scan_within_chunks(alpha: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """h_t = alpha_t h_{t-1} + w_t along dim 2 from h = 0, in log2(l) doubling steps (Hillis & Steele 1986).

    Used by the diagonal scan when a chunk decays too much for the factored form, or holds a document start
    (alpha = 0 there); stable for any decay, zero included.

    Returns:
        h: the scanned w; prefix: the products alpha_1 ... alpha_t (the decay from the chunk start through t).
    """
    ell, shift = alpha.shape[2], 1
    while shift < ell:
        w = torch.cat([w[:, :, :shift], w[:, :, shift:] + alpha[:, :, shift:] * w[:, :, :-shift]], dim=2)
        alpha = torch.cat([alpha[:, :, :shift], alpha[:, :, shift:] * alpha[:, :, :-shift]], dim=2)
        shift *= 2
    return w, alpha


def diagonal_chunked_scan(
    u: Tensor,
    log_alpha: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked scan of one scalar state per channel: s_t = exp(log_alpha_t) s_{t-1} + B_t u_t, y_t = C_t s_t.

    Args:
        u, B, C: (b, L, D) inputs, input gates and output gates per channel.
        log_alpha: (b, L, D) log decays (<= 0).
        chunk_size: tokens per chunk; any L works.
        initial_state: (b, D) state before the first token, or None for zeros.
        resets: (b, L) bool document starts, or None: at a start the state before it is dropped (alpha_t = 0).

    Returns:
        y: (b, L, D); final_state: (b, D) (that of the last document).
    """
    b, seq_len, D = u.shape
    if initial_state is None:
        initial_state = u.new_zeros(b, D)
    if seq_len == 0:
        return u.new_zeros(u.shape), initial_state
    ell, c, (u, log_alpha, B, C) = _split_chunks(chunk_size, u, log_alpha, B, C)
    if resets is not None:
        # A zero decay has no logarithm for the factored form: the doubling scan takes alpha itself, and its
        # prefix products (zero from a start on) carry the entering state and the chunk's decay.
        keep = ~_split_chunks(chunk_size, resets)[2][0]
        alpha = (log_alpha.exp() * keep[..., None]).view(b, c, ell, D)
        h_local, prefix = _scan_within_chunks(alpha, (B * u).view(b, c, ell, D))
        starts, final = carry_states(h_local[:, :, -1], prefix[:, :, -1], initial_state)  # (b, c, D)
        h = h_local + prefix * starts[:, :, None]
        return (C * h.view(b, c * ell, D))[:, :seq_len], final

    acum = log_alpha.view(b, c, ell, D).cumsum(2)  # (b, c, l, D)
    last = acum[:, :, -1]  # (b, c, D)
    w = (B * u).view(b, c, ell, D)
    if bool((-last).max() <= 2 * _half_range(u.dtype)) if last.numel() else True:
        # Same factoring as the SSD scan: the in-chunk sum becomes a cumulative sum.
        m = (0.5 * last).detach()[:, :, None]
        h_local = (acum - m).exp() * (w * (m - acum).exp()).cumsum(2)  # (b, c, l, D)
    else:
        h_local = _scan_within_chunks(log_alpha.view(b, c, ell, D).exp(), w)[0]
    starts, final = carry_states(h_local[:, :, -1], last.exp(), initial_state)  # (b, c, D)
    h = h_local + acum.exp() * starts[:, :, None]
    y = C * h.view(b, c * ell, D)
    return y[:, :seq_len], final
