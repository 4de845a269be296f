"""Calls that hand the C decoding kernels tensors they must not read: wrong shapes, dtypes, layouts, indices.

Run as a script (with case names, or none for all), it makes the calls below under ``no_grad`` (where the kernels
run) and prints one JSON line per case with whether the wrapper behaved: an error like PyTorch's, or PyTorch's own
answer, never a C read out of bounds. ``test_native_safety.py`` runs it in a child process, because before these
checks several of the calls corrupted the heap or crashed the interpreter (``linear(randn(3, 16), randn(4, 8))``
aborted with status 134).

Three kinds of expectation:

- ``LIKE_PYTORCH``: a drop-in for a PyTorch function (``linear``, ``rms_norm``, ``decode_attention``,
  ``gated_residual``): with the kernels on, the same exception type or the same values as with them off.
- ``RAISES``: a step wrapper given tensors that do not fit together raises a ValueError naming the op.
- ``NONE``: a step wrapper given tensors the kernel cannot take (dtype, layout) returns None, and the component
  runs its PyTorch step.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from hydra_kit.ops import (
    chunk_carry,
    decode_attention,
    linear,
    moe_step,
    native,
    norm,
    pkm_step,
    residual,
    rotary,
    router_step,
    ssm_mix,
    ssm_step,
    workspace_step,
)

LIKE_PYTORCH, RAISES, NONE = "like-pytorch", "raises", "none"


def _r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype)


def _sets(n: int = 6, hd: int = 8, **over: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    keys, values, mask = _r(2, 3, n, hd), _r(2, 3, n, hd), None
    keys, values, mask = over.get("keys", keys), over.get("values", values), over.get("mask", mask)
    return [(keys, values, mask)]


def _plan(columns: list[int | None]) -> residual.ResidualPlan:
    return residual.ResidualPlan(columns, [torch.nn.Parameter(torch.tensor(0.5)) for _ in columns])


def _ssm_weights(**over: Any) -> ssm_step.SSMStepWeights:
    d_model, heads, headdim, d_state, groups, d_conv = 16, 2, 4, 3, 1, 4
    d_inner = heads * headdim
    conv_dim = d_inner + 2 * groups * d_state
    shapes = {
        "in_weight": (d_inner + conv_dim + heads, d_model), "out_weight": (d_model, d_inner), "conv_weight": (conv_dim, 1, d_conv),
        "conv_bias": (conv_dim,), "dt_bias": (heads,), "a_log": (heads,), "d_skip": (heads,), "norm_weight": (d_inner,),
    }  # fmt: skip
    tensors = {name: over.get(name, _r(*shape)) for name, shape in shapes.items()}
    return ssm_step.pack_ssm_step_weights(**tensors, headdim=headdim, d_state=d_state, groups=groups)


def _ssm_step(u: torch.Tensor | None = None, conv: torch.Tensor | None = None, ssm: torch.Tensor | None = None) -> Any:
    weights = _ssm_weights()  # D 16, conv (3, 14), state (2, 4, 3)
    u = _r(2, 16) if u is None else u
    conv = torch.zeros(2, 3, 14) if conv is None else conv
    ssm = torch.zeros(2, 2, 4, 3) if ssm is None else ssm
    return ssm_step.ssm_step_cpu(u, conv, ssm, weights, 1e-5)


def _moe_weights(n_experts: int = 4, **over: Any) -> moe_step.MoEStepWeights:
    gate_up = over.get("gate_up", [_r(2 * 6, 16) for _ in range(n_experts)])
    down = over.get("down", [_r(16, 6) for _ in range(n_experts)])
    return moe_step.pack_moe_step_weights(over.get("router", _r(n_experts, 16)), gate_up, down)


def _router_weights(**over: Any) -> router_step.RouterStepWeights:
    return router_step.RouterStepWeights(over.get("gate_weight", _r(3, 16)), over.get("gate_bias", _r(3)), over.get("score_weight", _r(1, 16)))


def _workspace_weights(**over: Any) -> workspace_step.WorkspaceReadWeights:
    return workspace_step.WorkspaceReadWeights(over.get("query", _r(8, 16)), over.get("hop", _r(8, 8)), over.get("out", _r(16, 8)))


def _pkm(x: torch.Tensor | None = None, top_k: int = 4, **over: Any) -> Any:
    heads, n_keys, d_key, d_model, d_value = 2, 8, 8, 16, 12
    rows, cols = over.get("pairs", (torch.tensor([0, 0, 1, 0, 1, 2, 3]), torch.tensor([0, 1, 0, 2, 1, 0, 0])))
    return pkm_step.pkm_read_cpu(
        _r(2, d_model) if x is None else x, over.get("query_weight", _r(heads * d_key, d_model)), _r(heads, d_key),
        _r(heads, d_key), over.get("sub_keys", _r(heads, 2, n_keys, d_key // 2)), over.get("values", _r(n_keys * n_keys, d_value)),
        rows, cols, top_k,
    )  # fmt: skip


def _rotary(x: torch.Tensor | None = None, heads: int = 2, hd: int = 4, **over: Any) -> Any:
    weight = over.get("weight", _r(3 * heads * hd, 16))
    key_out, value_out = over.get("key_out"), over.get("value_out")
    return rotary.qkv_rotary(_r(2, 16) if x is None else x, weight, over.get("weight_b"), over.get("inv_freq", _r(hd // 2).abs()), heads, 7, key_out, value_out)


def _conv(**over: Any) -> Any:
    x = over.get("x", _r(2, 5, 9)[:, :, 1:7])  # a column slice, as the SSM reads it
    return ssm_mix.conv_silu(x, over.get("state", _r(2, 3, 6)), over.get("weight", _r(6, 4)), over.get("bias", _r(6)), over.get("offsets"))


def _norm(**over: Any) -> Any:
    y, x, z = (over.get(k, _r(2, 5, 8)) for k in ("y", "x", "z"))
    return ssm_mix.gated_norm(y, x, over.get("d", _r(8)), z, over.get("weight", _r(8)), 1e-5, over.get("groups", 2))


def _carry(**over: Any) -> Any:
    local, scales = over.get("local", _r(2, 3, 1, 2, 2, 4)), [over.get(k, _r(2, 3, 2)) for k in ("scale_in", "decay", "scale_out")]
    return chunk_carry.chunk_carry(local, *scales, over.get("initial", _r(2, 1, 2, 2, 4)))


CASES: dict[str, tuple[str, Callable[[], Any]]] = {
    # hydra_kit.ops.linear: F.linear's checks and errors (the repro first)
    "linear-inner-dims": (LIKE_PYTORCH, lambda: linear(_r(3, 16), _r(4, 8))),
    "linear-short-bias": (LIKE_PYTORCH, lambda: linear(_r(3, 16), _r(4, 16), _r(2))),
    "linear-broadcast-bias": (LIKE_PYTORCH, lambda: linear(_r(3, 16), _r(4, 16), _r(1))),
    "linear-float64-input": (LIKE_PYTORCH, lambda: linear(_r(3, 16, dtype=torch.float64), _r(4, 16))),
    "linear-float64-bias": (LIKE_PYTORCH, lambda: linear(_r(3, 16), _r(4, 16), _r(4, dtype=torch.float64))),
    "linear-strided-input": (LIKE_PYTORCH, lambda: linear(_r(16, 3).t(), _r(4, 16))),
    "linear-strided-weight": (LIKE_PYTORCH, lambda: linear(_r(3, 16), _r(16, 4).t())),
    "linear-1d-weight": (LIKE_PYTORCH, lambda: linear(_r(3, 16), _r(16))),
    "linear-0d-input": (LIKE_PYTORCH, lambda: linear(torch.tensor(1.0), _r(4, 16))),
    # rms_norm
    "rms-norm-short-weight": (LIKE_PYTORCH, lambda: norm.rms_norm(_r(3, 16), _r(8), 1e-6)),
    "rms-norm-long-weight": (LIKE_PYTORCH, lambda: norm.rms_norm(_r(3, 16), _r(32), 1e-6)),
    "rms-norm-2d-weight": (LIKE_PYTORCH, lambda: norm.rms_norm(_r(3, 16), _r(1, 16), 1e-6)),
    "rms-norm-float64-weight": (LIKE_PYTORCH, lambda: norm.rms_norm(_r(3, 16), _r(16, dtype=torch.float64), 1e-6)),
    "rms-norm-strided-input": (LIKE_PYTORCH, lambda: norm.rms_norm(_r(16, 3).t(), _r(16), 1e-6)),
    # decode_attention: the reference's checks and errors
    "attention-narrow-keys": (LIKE_PYTORCH, lambda: decode_attention.decode_attention(_r(2, 3, 16), _sets(hd=8, values=_r(2, 3, 6, 16)), 0.3)),
    "attention-short-values": (LIKE_PYTORCH, lambda: decode_attention.decode_attention(_r(2, 3, 8), _sets(values=_r(2, 3, 5, 8)), 0.3)),
    "attention-few-heads": (LIKE_PYTORCH, lambda: decode_attention.decode_attention(_r(2, 4, 8), _sets(), 0.3)),
    "attention-short-mask": (LIKE_PYTORCH, lambda: decode_attention.decode_attention(_r(2, 3, 8), _sets(mask=torch.ones(2, 5, dtype=torch.bool)), 0.3)),
    "attention-float-mask": (LIKE_PYTORCH, lambda: decode_attention.decode_attention(_r(2, 3, 8), _sets(mask=torch.ones(2, 6)), 0.3)),
    "attention-float64-keys": (LIKE_PYTORCH, lambda: decode_attention.decode_attention(_r(2, 3, 8), _sets(keys=_r(2, 3, 6, 8, dtype=torch.float64)), 0.3)),
    "attention-2d-query": (LIKE_PYTORCH, lambda: decode_attention.decode_attention(_r(2, 8), _sets(), 0.3)),
    "attention-no-sets": (LIKE_PYTORCH, lambda: decode_attention.decode_attention(_r(2, 3, 8), [], 0.3)),
    # gated_residual
    "residual-short-update": (LIKE_PYTORCH, lambda: residual.gated_residual(_r(2, 16), [_r(2, 15)], None, _plan([None]))),
    "residual-broadcast-update": (LIKE_PYTORCH, lambda: residual.gated_residual(_r(2, 16), [_r(1, 16)], None, _plan([None]))),
    "residual-float64-update": (LIKE_PYTORCH, lambda: residual.gated_residual(_r(2, 16), [_r(2, 16, dtype=torch.float64)], None, _plan([None]))),
    "residual-strided-update": (LIKE_PYTORCH, lambda: residual.gated_residual(_r(2, 16), [_r(16, 2).t()], None, _plan([None]))),
    "residual-short-gates": (RAISES, lambda: residual.gated_residual(_r(2, 16), [_r(2, 16)], _r(2, 2), _plan([3]))),
    "residual-few-gate-rows": (LIKE_PYTORCH, lambda: residual.gated_residual(_r(4, 16), [_r(4, 16)], _r(3, 2), _plan([1]))),
    # qkv_rotary
    "rotary-rows": (RAISES, lambda: _rotary(weight=_r(20, 16))),
    "rotary-width": (RAISES, lambda: _rotary(weight=_r(24, 12))),
    "rotary-split-rows": (RAISES, lambda: _rotary(weight=_r(8, 16), weight_b=_r(8, 16))),
    "rotary-key-slot": (RAISES, lambda: _rotary(key_out=torch.zeros(2, 2, 2), value_out=torch.zeros(2, 2, 2))),
    "rotary-key-without-value": (RAISES, lambda: _rotary(key_out=torch.zeros(2, 2, 4))),
    "rotary-float64": (NONE, lambda: _rotary(x=_r(2, 16, dtype=torch.float64))),
    "rotary-strided": (NONE, lambda: _rotary(x=_r(16, 2).t())),
    # the SSM step
    "ssm-token-width": (RAISES, lambda: _ssm_step(u=_r(2, 12))),
    "ssm-conv-state": (RAISES, lambda: _ssm_step(conv=torch.zeros(2, 2, 14))),
    "ssm-state": (RAISES, lambda: _ssm_step(ssm=torch.zeros(2, 2, 4, 2))),
    "ssm-state-batch": (RAISES, lambda: _ssm_step(ssm=torch.zeros(3, 2, 4, 3))),
    "ssm-float64": (NONE, lambda: _ssm_step(u=_r(2, 16, dtype=torch.float64))),
    "ssm-strided": (NONE, lambda: _ssm_step(u=_r(16, 2).t())),
    "ssm-pack-out-weight": (RAISES, lambda: _ssm_weights(out_weight=_r(16, 6))),
    "ssm-pack-norm-weight": (RAISES, lambda: _ssm_weights(norm_weight=_r(4))),
    "ssm-pack-in-weight": (RAISES, lambda: _ssm_weights(in_weight=_r(30, 16))),
    # the MoE step
    "moe-token-width": (RAISES, lambda: moe_step.moe_step_cpu(_r(1, 12), _moe_weights(), 2)),
    "moe-top-k-above-experts": (RAISES, lambda: moe_step.moe_step_cpu(_r(1, 16), _moe_weights(), 5)),
    "moe-top-k-zero": (RAISES, lambda: moe_step.moe_step_cpu(_r(1, 16), _moe_weights(), 0)),
    "moe-float64": (NONE, lambda: moe_step.moe_step_cpu(_r(1, 16, dtype=torch.float64), _moe_weights(), 2)),
    "moe-pack-down": (RAISES, lambda: _moe_weights(down=[_r(16, 6)] * 3 + [_r(16, 4)])),
    "moe-pack-few-experts": (RAISES, lambda: _moe_weights(gate_up=[_r(12, 16)] * 3)),
    "moe-pack-router": (RAISES, lambda: _moe_weights(router=_r(4, 12))),
    # the router step
    "router-token-width": (RAISES, lambda: router_step.router_step_cpu(_r(2, 1, 12), _router_weights(), 1.0)),
    "router-float64": (NONE, lambda: router_step.router_step_cpu(_r(2, 1, 16, dtype=torch.float64), _router_weights(), 1.0)),
    "router-pack-bias": (RAISES, lambda: _router_weights(gate_bias=_r(2))),
    "router-pack-score": (RAISES, lambda: _router_weights(score_weight=_r(1, 8))),
    # the PKM read
    "pkm-query-weight": (RAISES, lambda: _pkm(query_weight=_r(8, 16))),
    "pkm-values": (RAISES, lambda: _pkm(values=_r(32, 12))),
    "pkm-token-width": (RAISES, lambda: _pkm(x=_r(2, 12))),
    "pkm-pair-outside": (RAISES, lambda: _pkm(pairs=(torch.tensor([0, 4, 1, 0]), torch.tensor([0, 0, 1, 2])))),
    "pkm-negative-pair": (RAISES, lambda: _pkm(pairs=(torch.tensor([0, -1, 1, 0]), torch.tensor([0, 0, 1, 2])))),
    "pkm-top-k-above-keys": (RAISES, lambda: _pkm(top_k=9, pairs=(torch.arange(9).repeat(9), torch.arange(9).repeat_interleave(9)))),
    "pkm-top-k-above-pairs": (RAISES, lambda: _pkm(top_k=8)),
    "pkm-top-k-zero": (RAISES, lambda: _pkm(top_k=0)),
    "pkm-int32-pairs": (NONE, lambda: _pkm(pairs=(torch.tensor([0, 1, 0]).int(), torch.tensor([0, 0, 1]).int()))),
    "pkm-strided": (NONE, lambda: _pkm(x=_r(16, 2).t())),
    # the workspace read
    "workspace-slot-width": (RAISES, lambda: workspace_step.workspace_read_cpu(_r(2, 16), _r(2, 5, 12), _workspace_weights(), 2)),
    "workspace-slot-batch": (RAISES, lambda: workspace_step.workspace_read_cpu(_r(2, 16), _r(1, 5, 16), _workspace_weights(), 2)),
    "workspace-token-width": (RAISES, lambda: workspace_step.workspace_read_cpu(_r(2, 12), _r(2, 5, 16), _workspace_weights(), 2)),
    "workspace-float64": (NONE, lambda: workspace_step.workspace_read_cpu(_r(2, 16, dtype=torch.float64), _r(2, 5, 16), _workspace_weights(), 2)),
    "workspace-pack-hop": (RAISES, lambda: _workspace_weights(hop=_r(8, 6))),
    "workspace-pack-out": (RAISES, lambda: _workspace_weights(out=_r(12, 8))),
    # the SSM's sequence stages (ssm_mix) and the scan's carry
    "conv-state": (RAISES, lambda: _conv(state=_r(2, 2, 6))),
    "conv-weight": (RAISES, lambda: _conv(weight=_r(5, 4))),
    "conv-bias": (RAISES, lambda: _conv(bias=_r(4))),
    "conv-offsets": (RAISES, lambda: _conv(offsets=torch.zeros(2, 4, dtype=torch.long))),
    "conv-2d-input": (RAISES, lambda: _conv(x=_r(5, 6))),
    "conv-float64": (LIKE_PYTORCH, lambda: _conv(x=_r(2, 5, 6, dtype=torch.float64))),
    "conv-strided-channels": (LIKE_PYTORCH, lambda: _conv(x=_r(2, 6, 5).transpose(1, 2))),
    "conv-int32-offsets": (LIKE_PYTORCH, lambda: _conv(offsets=torch.tensor([[0, 1, 2, 0, 1], [5, 6, 7, 8, 9]], dtype=torch.int32))),
    "conv-strided-state": (LIKE_PYTORCH, lambda: _conv(state=_r(2, 6, 3).transpose(1, 2))),
    "norm-gate-shape": (RAISES, lambda: _norm(z=_r(2, 4, 8))),
    "norm-groups": (RAISES, lambda: _norm(groups=3)),
    "norm-short-weight": (RAISES, lambda: _norm(weight=_r(4))),
    "norm-2d": (RAISES, lambda: _norm(y=_r(5, 8))),
    "norm-float64": (LIKE_PYTORCH, lambda: _norm(y=_r(2, 5, 8, dtype=torch.float64))),
    "norm-strided-channels": (LIKE_PYTORCH, lambda: _norm(x=_r(2, 8, 5).transpose(1, 2))),
    "carry-scale-shape": (RAISES, lambda: _carry(decay=_r(2, 3, 1))),
    "carry-initial": (RAISES, lambda: _carry(initial=_r(2, 1, 2, 2, 3))),
    "carry-5d-local": (RAISES, lambda: _carry(local=_r(2, 3, 2, 2, 4))),
    "carry-float64": (LIKE_PYTORCH, lambda: _carry(local=_r(2, 3, 1, 2, 2, 4, dtype=torch.float64))),
    "carry-strided": (LIKE_PYTORCH, lambda: _carry(local=_r(2, 3, 1, 2, 4, 2).transpose(-1, -2))),
}  # fmt: skip


def _outcome(kind: str, call: Callable[[], Any]) -> tuple[bool, str]:
    """Whether the call behaved, and what it did, in words."""
    try:
        result = call()
    except Exception as err:  # what it raised is the point
        raised: BaseException | None = err
    else:
        raised = None
    did = f"raised {type(raised).__name__}: {raised}" if raised is not None else f"returned {type(result).__name__}"
    if kind == RAISES:
        return isinstance(raised, ValueError), did
    if kind == NONE:
        return raised is None and result is None, did
    with native.native_kernels(False):
        try:
            expected = call()
        except Exception as err:
            return raised is not None and type(raised) is type(err), f"{did}; PyTorch raised {type(err).__name__}: {err}"
    if raised is not None:
        return False, f"{did}; PyTorch returned"
    torch.testing.assert_close(result, expected)  # a mismatch fails the case with the values
    return True, did


def main(names: list[str]) -> int:
    """Run the named cases (all when none are named) in order, printing a JSON line before and after each."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name in names or list(CASES):
            kind, call = CASES[name]
            print(json.dumps({"case": name, "started": True}), flush=True)
            try:
                ok, did = _outcome(kind, call)
            except AssertionError as err:
                ok, did = False, f"values differ from PyTorch's: {err}"
            print(json.dumps({"case": name, "ok": ok, "did": did}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
