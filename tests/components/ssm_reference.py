"""Sequential reference recurrences for the SSM tests: a plain loop over time, written for clarity, never for speed.

These are the oracles the chunked scans and the whole SelectiveSSM layer are compared against; nothing in the
library imports them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ssd_reference(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T and y_t = S_t C_t, one step at a time.

    Args:
        x: (b, L, H, P); dt: (b, L, H); A: (H,); B, C: (b, L, G, N); initial_state: (b, H, P, N) or None.

    Returns:
        y (b, L, H, P) and the final state (b, H, P, N).
    """
    b, length, H, P = x.shape
    G, N = B.shape[-2:]
    group = torch.arange(H) // (H // G)  # the B/C group of each head
    state = x.new_zeros(b, H, P, N) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        Bt, Ct = B[:, t, group], C[:, t, group]  # (b, H, N)
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, H, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ct))
    return (torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)), state


def diagonal_reference(
    u: Tensor, log_alpha: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """s_t = exp(log_alpha_t) s_{t-1} + B_t u_t and y_t = C_t s_t per channel; all (b, L, D), state (b, D)."""
    state = u.new_zeros(u.shape[0], u.shape[2]) if initial_state is None else initial_state
    ys = []
    for t in range(u.shape[1]):
        state = torch.exp(log_alpha[:, t]) * state + B[:, t] * u[:, t]
        ys.append(C[:, t] * state)
    return (torch.stack(ys, dim=1) if ys else u.new_zeros(u.shape)), state


def layer_reference(module, x: Tensor) -> Tensor:
    """The whole SelectiveSSM layer from its parameters, one token at a time, from a zero state.

    Independent of the module's forward and step: the convolution is an explicit window sum, the scan the
    recurrence above, the gated norm written out.

    Args:
        module: a SelectiveSSM.
        x: (b, L, d_model).

    Returns:
        (b, L, d_model).
    """
    b, length, _ = x.shape
    H, P, N, G, K = module.nheads, module.headdim, module.d_state, module.ngroups, module.d_conv
    proj = x @ module.in_proj.weight.T  # (b, L, d_in_proj)
    z = proj[..., : module.d_inner]
    xbc = proj[..., module.d_inner : module.d_inner + module.conv_dim]
    dt = F.softplus(proj[..., module.d_inner + module.conv_dim :] + module.dt_bias)  # (b, L, H)
    weight = module.conv.weight[:, 0]  # (conv_dim, K): tap K-1 multiplies the current token
    conv = torch.zeros_like(xbc)
    for t in range(length):
        for k in range(K):
            src = t - (K - 1 - k)
            if src >= 0:
                conv[:, t] += weight[:, k] * xbc[:, src]
    conv = F.silu(conv + module.conv.bias)
    bc = G * N if module.variant == "ssd" else module.d_inner
    xs, Bm, Cm = conv.split([module.d_inner, bc, bc], dim=-1)
    A = -torch.exp(module.A_log)
    if module.variant == "ssd":
        y, _ = ssd_reference(xs.view(b, length, H, P), dt, A, Bm.view(b, length, G, N), Cm.view(b, length, G, N))
        y = (y + xs.view(b, length, H, P) * module.D[:, None]).reshape(b, length, module.d_inner)
    else:
        y, _ = diagonal_reference(xs, dt * A, Bm, Cm)
        y = y + xs * module.D
    gated = (y * F.silu(z)).view(b, length, G, module.d_inner // G)
    normed = gated / torch.sqrt(gated.square().mean(-1, keepdim=True) + module.norm_eps)
    return (normed.reshape(b, length, module.d_inner) * module.norm.weight) @ module.out_proj.weight.T
