"""Selective state-space backbone: a Mamba-2 mixer computed by a chunked scan (docs/design.md 3.3).

Dao & Gu 2024, "Transformers are SSMs" (state-space duality, arXiv 2405.21060). Per head h, with a scalar decay
``A_h < 0`` and a data-dependent step ``dt_t > 0``, the state ``S`` (headdim x d_state) follows

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T,        y_t = S_t C_t + D_h x_t.

The ``diagonal`` variant is the Hydra paper's own equation (arXiv 2508.15099): one scalar state per channel,
``s_t = alpha_t s_{t-1} + B_t U_t``, ``alpha_t = exp(-softplus(dt_t) lambda)``, ``y_t = C_t s_t + W_skip U_t``,
with B_t, C_t, dt_t per channel and W_skip diagonal.

The scans, the convolution and the one-token step kernel are ops (:mod:`hydra_kit.ops.scan`,
:mod:`hydra_kit.ops.conv`, :mod:`hydra_kit.ops.mamba_ssd`, :mod:`hydra_kit.ops.ssm_step`); this module is the
layer around them. Both scans take an initial state and return the final one, so a sequence may be processed in
pieces (and :meth:`SelectiveSSM.step` is the O(1) recurrent update).

Document boundaries (``context.segment_ids``, docs/design.md 3.10): at every document start the scan drops its
state and the convolution reads zeros for the tokens before it, so each document of a packed window gets exactly
the outputs it gets alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hydra_kit.ops import Linear, RMSNorm
from hydra_kit.ops.mamba_ssd import mamba_ssd_scan, unavailable_reason
from hydra_kit.ops.packed import PackedWeights, Reader
from hydra_kit.ops.scan import diagonal_chunked_scan, ssd_chunked_scan
from hydra_kit.ops.segments import document_offsets, document_starts
from hydra_kit.ops.ssm_mix import conv_silu, gated_norm
from hydra_kit.ops.ssm_step import SSMStepWeights, pack_ssm_step_weights, ssm_step_cpu
from hydra_kit.protocol import ComponentContext, ComponentOutput, ComponentPath, TriPathComponent

__all__ = ["SSMState", "SelectiveSSM"]


@dataclass
class SSMState:
    """Recurrent state of :class:`SelectiveSSM`.

    Attributes:
        conv: (B, d_conv - 1, conv_dim) the last d_conv - 1 inputs of the causal convolution.
        ssm: (B, H, P, N) the SSM state; the diagonal variant has H = d_inner and P = N = 1.
    """

    conv: Tensor
    ssm: Tensor


_SSD_BACKENDS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"torch": ssd_chunked_scan, "mamba_ssm": mamba_ssd_scan}
BACKENDS = ("auto", "torch", "mamba_ssm")


def _scan_backend(requested: str, variant: str, x: Tensor) -> str:
    """The scan implementation for this call: "auto" takes mamba-ssm's fused kernels for CUDA tensors when they
    can run, and the torch scan otherwise (always for the diagonal variant, which mamba-ssm does not cover)."""
    if requested == "torch" or variant == "diagonal" or (requested == "auto" and x.device.type != "cuda"):
        return "torch"  # decided without probing the mamba-ssm install: this runs once per segment and layer
    reason = unavailable_reason(x.device)
    if requested == "mamba_ssm" and reason is not None:
        raise RuntimeError(f"ssm: backend 'mamba_ssm' cannot run: {reason}")
    return "mamba_ssm" if reason is None else "torch"


class SelectiveSSM(TriPathComponent):
    """Mamba-2 selective SSM mixer, the always-on backbone of every Hydra block.

    in_proj -> (z, x, B, C, dt); causal depthwise conv + SiLU on (x, B, C); chunked scan with decay
    exp(dt A), dt = softplus(dt_raw + dt_bias), A = -exp(A_log); skip D x; gated RMSNorm norm(y * silu(z));
    out_proj. The ``diagonal`` variant keeps this block but scans one state per channel (see module docstring).

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        d_state: state size N per head (ssd only).
        expand: inner width d_inner = expand * d_model.
        headdim: channels per head P (ssd only); must divide d_inner.
        d_conv: width of the causal depthwise convolution (1 disables mixing in it).
        chunk_size: scan chunk length (the default is the fastest on CPU at 8K tokens; ``docs/benchmarks.md``).
        ngroups: groups of heads sharing B and C (ssd only); must divide the number of heads.
        variant: "ssd" (Mamba-2, scalar decay per head) or "diagonal" (the paper's one state per channel).
        backend: scan implementation. "torch": the chunked scan of this file, on any device. "mamba_ssm": the
            fused Triton kernels of the mamba-ssm package (CUDA only, ssd variant; installed by
            ``scripts/install-gpu.sh``); asking for it where it cannot run is an error saying why. "auto"
            (default): mamba_ssm for CUDA tensors when it can run, torch otherwise.
        segment_len: forward processes the sequence in pieces of this many tokens, carrying the state (same
            result); bounds the size of temporaries, which CPU allocators handle much faster below ~32 MB.
        dt_min, dt_max: range of the log-uniform initial step size.
        a_init_range: range of the uniform initial decay rate -A (lambda for the diagonal variant).
        norm_eps: epsilon of the gated RMSNorm.
        recompute: under autograd, save only the input projection of each segment and recompute the
            convolution, scan and gated norm in backward (same gradients): about a third less peak memory
            in a long-sequence training step (``docs/benchmarks.md``), for one more pass of the cheap part.
    """

    path: ClassVar[ComponentPath] = ComponentPath.SEQUENCE
    gated_by_router: ClassVar[bool] = False
    layerscale_init: ClassVar[float] = 0.8
    example_init_args: ClassVar[dict[str, Any]] = {"d_state": 8, "headdim": 16, "chunk_size": 8, "segment_len": 16}
    # The scan drops its state and the convolution its window at every document start (both variants, both
    # backends: mamba-ssm's kernels take the same boundaries as seq_idx).
    supports_resets: ClassVar[bool] = True

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        *,
        d_state: int = 64,
        expand: int = 2,
        headdim: int = 64,
        d_conv: int = 4,
        chunk_size: int = 64,
        ngroups: int = 1,
        variant: Literal["ssd", "diagonal"] = "ssd",
        backend: Literal["auto", "torch", "mamba_ssm"] = "auto",
        segment_len: int = 2048,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        a_init_range: tuple[float, float] = (1.0, 16.0),
        norm_eps: float = 1e-5,
        recompute: bool = True,
    ) -> None:
        super().__init__(d_model, layer_idx)
        for name, value in (("d_state", d_state), ("expand", expand), ("headdim", headdim), ("d_conv", d_conv)):
            if value <= 0:
                raise ValueError(f"ssm: {name} must be positive, got {value}")
        if chunk_size <= 0 or ngroups <= 0:
            raise ValueError(f"ssm: chunk_size ({chunk_size}) and ngroups ({ngroups}) must be positive")
        if variant not in ("ssd", "diagonal"):
            raise ValueError(f"ssm: variant must be 'ssd' or 'diagonal', got {variant!r}")
        if backend not in BACKENDS:
            raise ValueError(f"ssm: backend must be one of {list(BACKENDS)}, got {backend!r}")
        if backend == "mamba_ssm":
            if variant == "diagonal":
                raise ValueError("ssm: backend 'mamba_ssm' implements the ssd variant only; use backend 'torch' or 'auto'")
            reason = unavailable_reason()
            if reason is not None:
                raise ValueError(f"ssm: backend 'mamba_ssm' is not available: {reason}")
        if segment_len <= 0 or segment_len % chunk_size:
            raise ValueError(f"ssm: segment_len must be a positive multiple of chunk_size={chunk_size}, got {segment_len}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"ssm: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if len(a_init_range) != 2 or not 0 < a_init_range[0] <= a_init_range[1]:
            raise ValueError(f"ssm: a_init_range must be (low, high) with 0 < low <= high, got {a_init_range}")
        d_inner = expand * d_model
        if variant == "ssd":
            if d_inner % headdim:
                raise ValueError(f"ssm: headdim={headdim} must divide d_inner = expand * d_model = {d_inner}")
            if (d_inner // headdim) % ngroups:
                raise ValueError(f"ssm: ngroups={ngroups} must divide the number of heads {d_inner // headdim}")
            nheads, bc_width = d_inner // headdim, ngroups * d_state
        else:  # one state per channel: every channel is its own head with its own B, C and dt
            headdim, d_state, ngroups, nheads, bc_width = 1, 1, 1, d_inner, d_inner
        self.variant, self.backend = variant, backend
        self.d_inner, self.nheads, self.headdim, self.d_state, self.ngroups = d_inner, nheads, headdim, d_state, ngroups
        self.d_conv, self.chunk_size, self.segment_len, self.norm_eps = d_conv, chunk_size, segment_len, norm_eps
        self.recompute = recompute
        self.conv_dim = d_inner + 2 * bc_width
        self.in_proj = Linear(d_model, d_inner + self.conv_dim + nheads, bias=False)  # -> z, (x, B, C), dt
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.out_proj = Linear(d_inner, d_model, bias=False)
        self.norm = RMSNorm(d_inner, eps=norm_eps)  # gated: norm(y * silu(z)), per group of channels

        # Mamba-2 inits: dt log-uniform in [dt_min, dt_max] stored through the inverse softplus, A uniform.
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(nheads).uniform_(*a_init_range).log())
        self.D = nn.Parameter(torch.ones(nheads))
        for param in (self.dt_bias, self.A_log, self.D):
            param._hydra_no_weight_decay = True  # type: ignore[attr-defined]
        self._step_pack: PackedWeights[SSMStepWeights] = PackedWeights()  # what the C step reads, packed once

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, variant={self.variant}, d_inner={self.d_inner}, heads={self.nheads}, "
            f"headdim={self.headdim}, d_state={self.d_state}, chunk_size={self.chunk_size}"
        )

    def active_parameters(self) -> int:
        """Every parameter is used for every token."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Projections, convolution and the chunked scan, per token (a multiply-add counts 2)."""
        proj = 2.0 * (self.in_proj.weight.numel() + self.out_proj.weight.numel())
        conv = 2.0 * self.d_conv * self.conv_dim
        ell = min(self.chunk_size, max(seq_len, 1))
        if self.variant == "ssd":
            hpn = self.nheads * self.headdim * self.d_state
            # C B^T rows and the (l x l) @ (l x HP) intra-chunk product, B^T x into the chunk state, C S out of it.
            scan = 2.0 * ell * (self.ngroups * self.d_state + self.d_inner) + 4.0 * hpn
        else:
            scan = 8.0 * self.d_inner  # cumulative sums, decays and gates: a few multiply-adds per channel
        return proj + conv + scan

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> SSMState:
        return SSMState(
            conv=torch.zeros(batch_size, self.d_conv - 1, self.conv_dim, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype),
        )

    def _gated_norm(self, y: Tensor, xs: Tensor, z: Tensor) -> Tensor:
        """norm((y + D xs) * silu(z)): y, xs, z (..., d_inner) -> (..., d_inner); Mamba-2 normalises each group alone."""
        d = self.D.repeat_interleave(self.headdim) if self.variant == "ssd" else self.D  # (d_inner,): D per channel
        if y.dim() != 3:  # a decoding step's (B, d_inner)
            return self._gated_norm(y[:, None], xs[:, None], z[:, None])[:, 0]
        return gated_norm(y, xs, d, z, self.norm.weight, self.norm_eps, self.ngroups)

    def _conv_bias(self) -> Tensor:  # (conv_dim,); the conv is built with a bias
        bias = self.conv.bias
        assert bias is not None
        return bias

    def _mix(
        self, proj: Tensor, conv_in: Tensor, ssm_in: Tensor, resets: Tensor | None = None, offsets: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Everything between the two projections, for one piece of the sequence.

        Args:
            proj: (B, T, d_inner + conv_dim + H) the input projection (z, x B C, dt).
            conv_in, ssm_in: the state before the piece (:class:`SSMState` fields).
            resets, offsets: (B, T) document starts (bool) and each token's distance from its document's start
                (long), or None for one document (:mod:`hydra_kit.ops.segments`).

        Returns:
            the gated, normalised scan output (B, T, d_inner), and the conv and SSM states after the piece.
        """
        batch, seq_len, _ = proj.shape
        z, xbc_in, dt = proj.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        window = torch.cat([conv_in, xbc_in[:, max(seq_len - (self.d_conv - 1), 0) :]], dim=1)  # the last inputs
        conv_state = window[:, window.shape[1] - (self.d_conv - 1) :].contiguous()  # (B, d_conv - 1, conv_dim)
        xbc = conv_silu(xbc_in, conv_in, self.conv.weight[:, 0], self._conv_bias(), offsets)  # (B, T, conv_dim)
        bc = self.ngroups * self.d_state if self.variant == "ssd" else self.d_inner
        xs, B, C = xbc.split([self.d_inner, bc, bc], dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # (B, T, H)
        A = -self.A_log.exp()  # (H,)
        if self.variant == "ssd":
            y, ssm = _SSD_BACKENDS[_scan_backend(self.backend, self.variant, proj)](
                xs.view(batch, seq_len, self.nheads, self.headdim),
                dt,
                A,
                B.view(batch, seq_len, self.ngroups, self.d_state),
                C.view(batch, seq_len, self.ngroups, self.d_state),
                self.chunk_size,
                ssm_in,
                resets,
            )  # (B, T, H, P), (B, H, P, N)
            y = y.flatten(-2)
        else:
            y, ssm = diagonal_chunked_scan(xs, dt * A, B, C, self.chunk_size, ssm_in.flatten(1), resets)
            ssm = ssm.view_as(ssm_in)
        return self._gated_norm(y, xs, z), conv_state, ssm

    def _segment(
        self, x: Tensor, state: SSMState | None, resets: Tensor | None = None, offsets: Tensor | None = None
    ) -> tuple[Tensor, SSMState]:
        """One piece of the sequence: x (B, T, D) -> update (B, T, D) and the state after it (see :meth:`_mix`)."""
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        proj = self.in_proj(x)
        if self.recompute and torch.is_grad_enabled():
            # Keep only the projection for backward and run the conv, scan and norm again there (what mamba-ssm's
            # fused kernels do): about a quarter of the activation memory, for one more pass of the cheap part.
            normed, conv_state, ssm = checkpoint(self._mix, proj, state.conv, state.ssm, resets, offsets, use_reentrant=False)
        else:
            normed, conv_state, ssm = self._mix(proj, state.conv, state.ssm, resets, offsets)
        return self.out_proj(normed), SSMState(conv_state, ssm)

    def forward(
        self, x: Tensor, context: ComponentContext | None = None, state: SSMState | None = None
    ) -> ComponentOutput:
        segment_ids = None if context is None else context.segment_ids
        resets = offsets = None
        if segment_ids is not None:
            # Over the whole input, so the pieces below agree on where documents start: a piece's first token may
            # start one, and its convolution window may reach back into the previous piece.
            resets = document_starts(segment_ids)  # (B, L)
            offsets = document_offsets(resets)  # (B, L)
            if state is not None:  # the first document continues the carried convolution window
                offsets = offsets.masked_fill(resets.cumsum(1) == 0, self.d_conv)
        pieces = []
        for start in range(0, x.shape[1], self.segment_len):
            piece = slice(start, start + self.segment_len)
            if resets is None or offsets is None:
                out, state = self._segment(x[:, piece], state)
            else:
                out, state = self._segment(x[:, piece], state, resets[:, piece], offsets[:, piece])
            pieces.append(out)
        if not pieces:  # empty sequence: nothing to do, the state is unchanged
            return ComponentOutput(update=x.new_zeros(x.shape[0], 0, self.d_model), state=state)
        return ComponentOutput(update=torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0], state=state)

    def _pack_step(self, read: Reader) -> SSMStepWeights:
        """The parameters the C step reads, packed (cached by ``self._step_pack``, which watches what ``read`` reads)."""
        names = ("in_proj.weight", "out_proj.weight", "conv.weight", "conv.bias", "dt_bias", "A_log", "D", "norm.weight")
        weights = [read(name) for name in names]
        return pack_ssm_step_weights(*weights, headdim=self.headdim, d_state=self.d_state, groups=self.ngroups)

    def step(self, x_t: Tensor, state: SSMState, context: ComponentContext | None = None) -> ComponentOutput:
        """The O(1) recurrent update for one token x_t (B, D).

        Decoding is bound by per-op overhead once the weights are read, so this path uses few, in-place ops:
        broadcasting instead of expanded copies of B and C, and the state update as one fused multiply-add.
        """
        batch = x_t.shape[0]
        if self.variant == "ssd":
            fused = ssm_step_cpu(x_t, state.conv, state.ssm, self._step_pack.get(self, self._pack_step), self.norm_eps)
            if fused is not None:  # the same step as below, as one C call (CPU, float32, no autograd)
                update, conv, ssm = fused
                return ComponentOutput(update=update, state=SSMState(conv, ssm))
        z, xbc, dt = self.in_proj(x_t).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        window = torch.cat([state.conv, xbc[:, None]], dim=1)  # (B, d_conv, conv_dim)
        xbc = F.silu((window * self.conv.weight[:, 0].t()).sum(1) + self._conv_bias())  # the conv at the last position
        bc = self.ngroups * self.d_state if self.variant == "ssd" else self.d_inner
        xs, B, C = xbc.split([self.d_inner, bc, bc], dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # (B, H)
        decay = torch.exp(dt * -self.A_log.exp())  # (B, H)
        if self.variant == "ssd":
            g, hg, p, n = self.ngroups, self.nheads // self.ngroups, self.headdim, self.d_state
            x_h = xs.view(batch, g, hg, p, 1)
            ssm = state.ssm.view(batch, g, hg, p, n) * decay.view(batch, g, hg, 1, 1)  # (B, G, H/G, P, N)
            ssm.addcmul_(x_h * dt.view(batch, g, hg, 1, 1), B.view(batch, g, 1, 1, n))  # + dt x B^T
            y = torch.matmul(ssm, C.view(batch, g, 1, n, 1))  # (B, G, H/G, P, 1): C s
            ssm, y = ssm.view_as(state.ssm), y.flatten(1)  # (B, H, P, N), (B, d_inner)
        else:
            s = state.ssm.flatten(1) * decay + B * xs  # (B, d_inner)
            ssm, y = s.view_as(state.ssm), C * s
        update = self.out_proj(self._gated_norm(y, xs, z))  # the D skip is added there
        return ComponentOutput(update=update, state=SSMState(window[:, 1:].clone(), ssm))
