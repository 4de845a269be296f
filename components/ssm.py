"""Mamba-2 selective state-space model: the always-on backbone of the Hydra block (HYDRA.md 3.3).

Dao & Gu 2024, "Transformers are SSMs" (arXiv 2405.21060). Input projection to (z, x, B, C, dt), a short causal
depthwise convolution over (x, B, C), a chunked SSD scan with a scalar decay per head, a D skip, gated RMSNorm
and an output projection. The scan is matmul-heavy: within a chunk of Q tokens an attention-like (Q x Q)
product, across chunks a recurrence over the (P x N) state of each head, so time and memory are linear in L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hydra_kit.nn import RMSNorm
from hydra_kit.protocol import ComponentContext, ComponentOutput, ComponentPath, TriPathComponent


def ssd_chunked_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan of s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T, y_t = s_t C_t (one B/C group).

    Args:
        x: (b, l, h, p) inputs per head.
        dt: (b, l, h) positive step sizes.
        A: (h,) negative decay rates.
        B, C: (b, l, n) input and output projections of the state, shared by all heads.
        chunk_size: tokens per chunk; any length works (the tail is zero-padded, which leaves the state
            unchanged because a padded step has dt = 0).
        initial_state: (b, h, p, n) state before the first token, or None for zeros.

    Returns:
        y (b, l, h, p) and the final state (b, h, p, n).
    """
    b, length, h, p = x.shape
    n = B.shape[-1]
    pad = (-length) % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, pad))
    c = x.shape[1] // chunk_size
    q = chunk_size
    a = (dt * A).view(b, c, q, h).permute(0, 3, 1, 2)  # (b, h, c, q) log-decay per step
    xs = (x * dt[..., None]).view(b, c, q, h, p).permute(0, 3, 1, 2, 4)  # (b, h, c, q, p)
    Bc = B.view(b, c, q, n)
    Cc = C.view(b, c, q, n)
    cum = a.cumsum(-1)  # (b, h, c, q)
    # Intra-chunk: y_t += sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) x_s
    seg = cum[..., :, None] - cum[..., None, :]  # (b, h, c, q, q)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, -math.inf))
    cb = Cc @ Bc.transpose(-1, -2)  # (b, c, q, q), shared by all heads (one group)
    y = (cb[:, None] * decay) @ xs  # (b, h, c, q, p)
    # Chunk states: sum_s exp(cum_end - cum_s) x_s B_s^T
    to_end = torch.exp(cum[..., -1:] - cum)  # (b, h, c, q)
    states = (xs * to_end[..., None]).transpose(-1, -2) @ Bc[:, None]  # (b, h, c, p, n)
    chunk_decay = torch.exp(cum[..., -1])  # (b, h, c)
    state = initial_state if initial_state is not None else x.new_zeros(b, h, p, n)
    carried = []
    for i in range(c):  # sequential over chunks only: c = L / chunk_size small steps
        carried.append(state)
        state = state * chunk_decay[:, :, i, None, None] + states[:, :, i]
    prev = torch.stack(carried, dim=2)  # (b, h, c, p, n): state entering each chunk
    y = y + (Cc[:, None] @ prev.transpose(-1, -2)) * torch.exp(cum)[..., None]  # (b, h, c, q, p)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * q, h, p)[:, :length]
    return y, state



def diagonal_chunked_scan(log_alpha: Tensor, inputs: Tensor, chunk_size: int, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked scan of a diagonal recurrence s_t = exp(log_alpha_t) * s_{t-1} + inputs_t, one scalar state per channel.

    Args:
        log_alpha: (b, l, d) log decays (<= 0).
        inputs: (b, l, d) the B_t * U_t terms.
        chunk_size: tokens per chunk (memory grows with b * l * chunk_size * d, so keep it small).
        initial_state: (b, d) or None for zeros.

    Returns:
        states s_t (b, l, d) and the final state (b, d).
    """
    b, length, d = inputs.shape
    pad = (-length) % chunk_size
    if pad:  # padded steps have log-decay 0 and no input, so they leave the state unchanged
        log_alpha = F.pad(log_alpha, (0, 0, 0, pad))
        inputs = F.pad(inputs, (0, 0, 0, pad))
    c, q = log_alpha.shape[1] // chunk_size, chunk_size
    cum = log_alpha.view(b, c, q, d).cumsum(2)  # (b, c, q, d)
    u = inputs.view(b, c, q, d)
    causal = torch.ones(q, q, dtype=torch.bool, device=inputs.device).tril()[None, None, :, :, None]
    decay = torch.exp((cum[:, :, :, None] - cum[:, :, None, :]).masked_fill(~causal, -math.inf))  # (b, c, q, q, d)
    local = (decay * u[:, :, None]).sum(3)  # (b, c, q, d): the chunk's own contribution
    state = initial_state if initial_state is not None else inputs.new_zeros(b, d)
    carried = []
    for i in range(c):
        carried.append(state)
        state = state * torch.exp(cum[:, i, -1]) + local[:, i, -1]
    states = local + torch.exp(cum) * torch.stack(carried, dim=1)[:, :, None]
    return states.reshape(b, c * q, d)[:, :length], state


@dataclass
class SSMState:
    """conv: (B, d_conv - 1, conv_dim) last conv inputs; ssm: (B, H, P, N)."""

    conv: Tensor
    ssm: Tensor


class SelectiveSSM(TriPathComponent):
    """Mamba-2 selective SSM with a chunked SSD scan; its state is the conv buffer and the SSM state.

    Args:
        d_model: model width.
        layer_idx: index of the block holding this component.
        d_state: state size N per head.
        expand: inner width as a multiple of d_model.
        headdim: channels P per head; must divide expand * d_model.
        d_conv: width of the causal depthwise convolution.
        chunk_size: scan chunk length Q (speed knob; results do not depend on it).
        variant: "ssd" (Mamba-2, the default) or "diagonal": the paper's own equations, one scalar state per
            channel, alpha_t = exp(-softplus(dt_t) * lambda), s_t = alpha_t s_{t-1} + B_t U_t,
            y_t = C_t s_t + D U_t (d_state, headdim and d_conv are not used; keep chunk_size small, ~16, since
            its scan holds a (Q x Q) decay per channel).
        backend: "torch" (the chunked scan in PyTorch; CPU and GPU).
    """

    path: ClassVar[ComponentPath] = ComponentPath.SEQUENCE
    gated_by_router: ClassVar[bool] = False
    layerscale_init: ClassVar[float] = 0.8
    example_init_args: ClassVar[dict[str, Any]] = {"d_state": 8, "headdim": 16, "chunk_size": 8}

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        *,
        d_state: int = 64,
        expand: int = 2,
        headdim: int = 64,
        d_conv: int = 4,
        chunk_size: int = 128,
        variant: Literal["ssd", "diagonal"] = "ssd",
        backend: Literal["torch"] = "torch",
    ) -> None:
        super().__init__(d_model, layer_idx)
        d_inner = expand * d_model
        if variant not in ("ssd", "diagonal"):
            raise ValueError(f"ssm: unknown variant {variant!r}; available: 'ssd', 'diagonal'")
        if chunk_size <= 0 or d_conv <= 1 or d_state <= 0 or expand <= 0:
            raise ValueError(f"ssm: chunk_size ({chunk_size}), d_state ({d_state}), expand ({expand}) must be positive and d_conv ({d_conv}) > 1")
        self.variant = variant
        if variant == "diagonal":
            self.d_inner, self.chunk_size = d_inner, chunk_size
            self.proj = nn.Linear(d_model, 4 * d_inner, bias=False)  # (U, B, C, dt) per channel
            dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.lambda_log = nn.Parameter(torch.log(torch.empty(d_inner).uniform_(1, 16)))  # lambda > 0
            self.D = nn.Parameter(torch.ones(d_inner))
            for p in (self.dt_bias, self.lambda_log, self.D):
                p._hydra_no_weight_decay = True  # type: ignore[attr-defined]
            self.out_proj = nn.Linear(d_inner, d_model, bias=False)
            return
        if d_inner % headdim:
            raise ValueError(f"ssm: headdim={headdim} must divide expand * d_model = {d_inner}")
        if backend != "torch":
            raise ValueError(f"ssm: unknown backend {backend!r}; available: 'torch'")
        self.d_state, self.headdim, self.d_conv, self.chunk_size = d_state, headdim, d_conv, chunk_size
        self.d_inner, self.n_heads = d_inner, d_inner // headdim
        self.conv_dim = d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_state + self.n_heads, bias=False)
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=0)
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._hydra_no_weight_decay = True  # type: ignore[attr-defined]
        self.norm = RMSNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def flops_per_token(self, seq_len: int) -> float:
        # Projections and conv, plus the scan: intra-chunk (C B^T and the (Q x Q) product with x), chunk
        # states and their read-out, each about 2 * Q * N or 2 * P * N multiply-adds per head and token.
        q = min(self.chunk_size, seq_len)
        if self.variant == "diagonal":
            return 2.0 * self.active_parameters() + 2 * q * self.d_inner
        scan = 2 * (q * self.d_state + self.n_heads * q * self.headdim + 2 * self.n_heads * self.headdim * self.d_state)
        return 2.0 * self.active_parameters() + scan

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> SSMState:
        if self.variant == "diagonal":
            return SSMState(torch.zeros(batch_size, 0, 0, device=device, dtype=dtype), torch.zeros(batch_size, self.d_inner, device=device, dtype=dtype))
        return SSMState(torch.zeros(batch_size, self.d_conv - 1, self.conv_dim, device=device, dtype=dtype), torch.zeros(batch_size, self.n_heads, self.headdim, self.d_state, device=device, dtype=dtype))

    def _forward_diagonal(self, x: Tensor, state: SSMState | None) -> ComponentOutput:
        u, b_in, c_out, dt = self.proj(x).chunk(4, dim=-1)  # (B, L, d_inner) each
        log_alpha = -F.softplus(dt + self.dt_bias) * torch.exp(self.lambda_log)  # log alpha_t <= 0
        states, final = diagonal_chunked_scan(log_alpha, b_in * u, self.chunk_size, None if state is None else state.ssm)
        y = c_out * states + self.D * u
        return ComponentOutput(update=self.out_proj(y), state=SSMState(x.new_zeros(x.shape[0], 0, 0), final))

    def forward(self, x: Tensor, context: ComponentContext | None = None, state: SSMState | None = None) -> ComponentOutput:
        if self.variant == "diagonal":
            return self._forward_diagonal(x, state)
        b, length, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        past = state.conv if state is not None else xbc.new_zeros(b, self.d_conv - 1, self.conv_dim)
        padded = torch.cat([past, xbc], dim=1)  # (B, d_conv - 1 + L, conv_dim)
        xbc = F.silu(self.conv(padded.transpose(1, 2)).transpose(1, 2))  # (B, L, conv_dim)
        xs, Bm, Cm = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # (B, L, H)
        A = -torch.exp(self.A_log)
        xh = xs.view(b, length, self.n_heads, self.headdim)
        y, final = ssd_chunked_scan(xh, dt, A, Bm, Cm, self.chunk_size, None if state is None else state.ssm)
        y = y + xh * self.D[:, None]
        y = self.norm(y.reshape(b, length, self.d_inner) * F.silu(z))
        new_state = SSMState(padded[:, -(self.d_conv - 1):], final)
        return ComponentOutput(update=self.out_proj(y), state=new_state)
