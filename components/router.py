"""The per-token router of a tri-path block (docs/design.md 3.2, equations R1-R5).

The paper's router equations (v3 eqs. 1-4) could not be recovered; these are hydra-kit's::

    (R1) z_t = W_r u_t + b_r                      one logit per gated component c in the block
    (R2) r_t^c = sigmoid(z_t^c / tau)             soft gate, temperature tau
    (R3) s_t = w_g . u_t                          global-token score used by sparse global attention
    (R4) L_router = lambda * sum_c (mean_t r_t^c - rho_c)^2
    (R5) the block adds g_c * a * r_t^c * C_c(u)_t, a = gate_gain (default 2: the weight starts at 1)

Gates depend only on the token's own block input, so they are causal and are known before the gated
components run: at inference, tokens whose gate is below ``gate_threshold`` skip the component.

Trained skipping (``skip_in_training``): tokens under the threshold skip the component in training too, so the
model learns to do without it where its gate is low. The budget R4 then holds the compute actually spent: its
usage is the share of tokens at or above the threshold, ``k_c = mean_t 1[r_t^c >= theta]``, with the gradient
of ``mean_t r_t^c`` (straight-through: the step function has none). A skipped token gives its component no
gradient, and its gate hears only the budget, never the task: a token that would need the component has no way
to say so. ``explore`` is that way: in training, each skipped token is served anyway with this probability
(drawn per token, component and step), weighted by its own gate as any served token, so its gate learns from
the task. The budget still counts only the tokens at or above the threshold (the share inference will compute);
training computes about ``kept + explore * (1 - kept)`` of the tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from hydra_kit.ops import Linear
from hydra_kit.ops.packed import PackedWeights, Reader
from hydra_kit.ops.router_step import RouterStepWeights, router_step_cpu
from hydra_kit.protocol import ComponentPath, RouterComponent, RouterOutput


class TokenRouter(RouterComponent):
    """Sigmoid gates per token and gated component, plus the global-token score for SGA.

    Args:
        d_model: model width.
        layer_idx: index of the block holding the router.
        temperature: tau in R2; lower is sharper.
        gate_threshold: at inference, tokens whose gate is below this skip the component (0 disables).
        skip_in_training: skip them in training too (needs ``gate_threshold > 0``); the budget then counts the
            share of tokens computed (module docstring).
        explore: under ``skip_in_training``, the probability that a skipped token is served anyway in training
            (0 turns exploration off; must lie in [0, 1)).
        budget_weight: lambda in R4.
        target_usage: rho_c in R4, the mean gate each component should settle at; one number for all, or
            instance name -> number (instances not named use 0.5).
        gate_gain: a in the block's ``y = x + sum_c g_c * a * r_c * C_c(u)``. The default 2 centres the residual
            weight on 1 at initialisation (gates start at 0.5), so the router starts as a pass-through instead of
            halving every gated path (hydra-kit's decision, ``docs/design-decisions.md``); 1 is R2's plain gate.
    """

    path: ClassVar[ComponentPath] = ComponentPath.ROUTER
    example_init_args: ClassVar[dict[str, Any]] = {"temperature": 1.0}
    supports_resets: ClassVar[bool] = True  # gates and score of each token from that token alone

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        *,
        temperature: float = 1.0,
        gate_threshold: float = 0.0,
        budget_weight: float = 0.01,
        target_usage: float | dict[str, float] = 0.5,
        gate_gain: float = 2.0,
        skip_in_training: bool = False,
        explore: float = 0.0,
    ) -> None:
        super().__init__(d_model, layer_idx)
        if temperature <= 0:
            raise ValueError(f"router: temperature must be positive, got {temperature}")
        if not 0.0 <= gate_threshold < 1.0:
            raise ValueError(f"router: gate_threshold must lie in [0, 1), got {gate_threshold}")
        usages = target_usage.values() if isinstance(target_usage, dict) else [target_usage]
        if not all(0.0 < u < 1.0 for u in usages):
            raise ValueError(f"router: every target_usage must lie in (0, 1), got {target_usage}")
        if gate_gain <= 0:
            raise ValueError(f"router: gate_gain must be positive, got {gate_gain}")
        if skip_in_training and gate_threshold <= 0:
            raise ValueError("router: skip_in_training needs a gate_threshold above 0 (the gate below which a token skips)")
        if not 0.0 <= explore < 1.0:
            raise ValueError(f"router: explore must lie in [0, 1), got {explore}")
        if explore > 0 and not skip_in_training:
            raise ValueError("router: explore serves skipped tokens in training, so it needs skip_in_training: true")
        self.skip_in_training = skip_in_training
        self.explore = explore
        self.gate_gain = gate_gain
        self.temperature = temperature
        self.gate_threshold = gate_threshold
        self.budget_weight = budget_weight
        self.target_usage = target_usage
        self.gate_names: list[str] = []
        self.gate_proj: Linear | None = None  # created by configure_gates, once the gated names are known
        self.score_proj = Linear(d_model, 1, bias=False)  # w_g of R3
        self.register_buffer("rho", torch.zeros(0), persistent=False)
        self._step_pack: PackedWeights[RouterStepWeights] = PackedWeights()  # what the C step reads, checked once

    def configure_gates(self, names: list[str]) -> None:
        self.gate_names = list(names)
        self.gate_proj = Linear(self.d_model, len(names))
        # Small weights and zero bias: every gate starts near sigmoid(0) = 0.5 (docs/design.md 3.2).
        nn.init.normal_(self.gate_proj.weight, std=0.02 / self.d_model**0.5)
        nn.init.zeros_(self.gate_proj.bias)
        if isinstance(self.target_usage, dict):
            unknown = sorted(set(self.target_usage) - set(names))
            if unknown:
                raise ValueError(f"router: target_usage names {unknown} are not gated in block {self.layer_idx}; gated: {names}")
            rho = [self.target_usage.get(n, 0.5) for n in names]
        else:
            rho = [self.target_usage] * len(names)
        self.rho = torch.tensor(rho, dtype=self.gate_proj.weight.dtype)

    def _pack_step(self, read: Reader) -> RouterStepWeights:
        """The weights the C step reads, checked (cached by ``self._step_pack``, which watches what ``read`` reads)."""
        return RouterStepWeights(read("gate_proj.weight"), read("gate_proj.bias"), read("score_proj.weight"))

    def active_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def route(self, x: Tensor, *, collect_aux: bool = True) -> RouterOutput:
        if not collect_aux and self.gate_names:  # gates exist: configure_gates() was called
            fused = router_step_cpu(x, self._step_pack.get(self, self._pack_step), self.temperature)
            if fused is not None:  # decoding: the same gates and score in one C call (CPU, float32, no autograd)
                return RouterOutput(gates=fused[0], global_score=fused[1], aux_losses={}, stats={})
        if self.gate_proj is None:
            raise RuntimeError(f"router of block {self.layer_idx}: configure_gates() was never called")
        logits = self.gate_proj(x)  # (B, L, G)
        gates = torch.sigmoid(logits if self.temperature == 1.0 else logits / self.temperature)
        score = self.score_proj(x).squeeze(-1)  # (B, L)
        aux: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        if self.gate_names and collect_aux:
            flat = gates.flatten(0, 1)  # (B * L, G)
            usage = flat.mean(0)  # (G,)
            for name, value in zip(self.gate_names, usage.detach(), strict=True):
                stats[f"gate_{name}"] = value
            if self.gate_threshold > 0:
                kept = (flat >= self.gate_threshold).to(flat.dtype).mean(0)  # (G,) share of tokens computed
                for name, value in zip(self.gate_names, kept, strict=True):
                    stats[f"kept_{name}"] = value
                if self.skip_in_training:
                    usage = kept + usage - usage.detach()  # the value of the kept share, the gradient of the mean gate
            aux["budget"] = self.budget_weight * (usage - self.rho.to(usage)).square().sum()
        return RouterOutput(gates=gates, global_score=score, aux_losses=aux, stats=stats)
