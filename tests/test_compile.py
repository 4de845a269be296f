"""``--model.compile true``: the compiled forward and training step equal the eager ones; generation stays eager."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from hydra_kit.bench import training_batch
from hydra_kit.config.lightning import model_config
from hydra_kit.errors import RecipeError
from hydra_kit.model import HydraLM

TINY = str(Path(__file__).resolve().parents[1] / "recipes/tiny.yaml")


def _pair() -> tuple[HydraLM, HydraLM]:
    """The tiny recipe twice, with the same weights: eager, and compiled through the recipe option's spelling."""
    config = model_config([TINY])
    compiled_config = model_config([TINY], ["--model.compile", "true"])
    assert config["compile"] is False and compiled_config["compile"] is True
    torch.manual_seed(0)
    eager = HydraLM(**config)
    torch.manual_seed(0)
    compiled = HydraLM(**compiled_config)
    return eager, compiled


def _loss_and_grads(model: HydraLM, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # self.log() without a Trainer logs nothing, which is all a test needs
        warnings.filterwarnings("ignore", message=r"You are trying to `self\.log\(\)`")
        loss = model.training_step(training_batch(tokens), 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compile_is_off_by_default_and_must_be_a_bool():
    model = HydraLM(**model_config([TINY]))
    assert model.hparams["compile"] is False
    assert "_compiled_network" not in model.__dict__
    with pytest.raises(RecipeError, match=r"model\.compile: expected true or false"):
        HydraLM(compile="yes")  # type: ignore[arg-type]


@pytest.mark.slow  # the first compile of each mode takes tens of seconds on 2 CPU cores
def test_compiled_forward_and_training_step_equal_eager():
    eager, compiled = _pair()
    tokens = torch.randint(0, 72, (2, 32), generator=torch.Generator().manual_seed(0))
    try:
        # Training step: loss and every gradient.
        loss_e, grads_e = _loss_and_grads(eager, tokens)
        loss_c, grads_c = _loss_and_grads(compiled, tokens)
        assert "_compiled_network" in compiled.__dict__  # the step really ran through torch.compile
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        # A parameter the loss does not depend on (block 0's attention score, with no attention in block 0) has
        # no gradient in eager autograd and a zero one from the compiled graph: the same, for the loss.
        assert grads_e.keys() <= grads_c.keys()
        for name, grad in grads_c.items():
            expected = grads_e.get(name, torch.zeros_like(grad))
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        # Inference forward (eval mode: a graph of its own).
        eager.eval()
        compiled.eval()
        with torch.inference_mode():
            torch.testing.assert_close(compiled(tokens).logits, eager(tokens).logits, rtol=1e-5, atol=1e-5)
        # Generation steps token by token through the eager network, and gives the same tokens.
        prompt = tokens[:1, :8]
        assert torch.equal(
            torch.stack(list(compiled.generate(prompt, 6, temperature=0))), torch.stack(list(eager.generate(prompt, 6, temperature=0)))
        )
        # The wrapper is neither in the checkpoint nor carried into a copy (which compiles its own).
        assert compiled.state_dict().keys() == eager.state_dict().keys()
        duplicate = copy.deepcopy(compiled)
        assert "_compiled_network" not in duplicate.__dict__
        duplicate.eval()
        with torch.inference_mode():
            torch.testing.assert_close(duplicate.network(tokens).logits, eager(tokens).logits, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()  # free the compiled code and its guards for the tests that follow
