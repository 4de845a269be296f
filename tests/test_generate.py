"""Recurrent generation: whole-model step parity with every component, the lean decoding path, `hydra-kit generate`."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from fake_components import StepDriftMixer
from support import run_cli

from hydra_kit.data import TextDataModule
from hydra_kit.model import HydraLM
from hydra_kit.testing import ConformanceError, check_component

# Every mechanism, sized so that 40 tokens cross every internal boundary: SSM chunks of 8, an SGA window of 8
# that fills and slides with globals promoted from 4 chunks, workspace writes every 8 tokens.
EVERY_COMPONENT = {
    "ssm": {"component": "ssm", "blocks": "all", "args": {"d_state": 8, "headdim": 8, "chunk_size": 8}},
    "sga": {"component": "sga", "blocks": [1], "args": {"n_heads": 2, "window": 8, "max_global": 6, "globals_per_chunk": 2}},
    "moe": {"component": "moe", "blocks": "all", "args": {"n_experts": 4, "top_k": 2, "expert_hidden": 16}},
    "workspace": {"component": "workspace", "blocks": [0], "args": {"n_slots": 4, "chunk_size": 8}},
    "pkm": {"component": "pkm", "blocks": [2], "args": {"heads": 2, "n_keys": 8, "top_k": 4, "d_key": 16}},
    "router": {"component": "router", "blocks": "all"},
}


def every_component_model(**moe_args) -> HydraLM:
    components = copy.deepcopy(EVERY_COMPONENT)
    components["moe"]["args"].update(moe_args)
    torch.manual_seed(0)
    return HydraLM(vocab_size=40, d_model=32, n_blocks=3, components=components).double().eval()


def decode_logits(model: HydraLM, ids: torch.Tensor, prompt_len: int, collect_aux: bool) -> torch.Tensor:
    """Logits (B, L, V) from a prefill of ``prompt_len`` tokens, then one token per call with the carried state."""
    out = model(ids[:, :prompt_len], model.init_state(ids.shape[0], dtype=torch.float64), collect_aux=collect_aux)
    logits, state = [out.logits], out.state
    for t in range(prompt_len, ids.shape[1]):
        out = model(ids[:, t : t + 1], state, collect_aux=collect_aux)
        logits.append(out.logits)
        state = out.state
    return torch.cat(logits, dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("collect_aux", [True, False])
@pytest.mark.parametrize("moe_args", [{}, {"routing": "chunk", "chunk_size": 8}], ids=["token-moe", "chunk-moe"])
def test_step_by_step_logits_equal_full_forward(batch, collect_aux, moe_args):
    model = every_component_model(**moe_args)
    ids = torch.randint(0, 40, (batch, 40), generator=torch.Generator().manual_seed(batch))
    full = model(ids).logits
    # A prompt of 5 ends inside the first chunk; the 35 decoded tokens fill the SGA window and cross 4 chunk ends.
    torch.testing.assert_close(decode_logits(model, ids, 5, collect_aux), full, rtol=0, atol=1e-10)


def test_lean_forward_drops_aux_and_stats_but_not_logits_or_state():
    model = every_component_model()
    ids = torch.randint(0, 40, (2, 21))
    full = model(ids, model.init_state(2, dtype=torch.float64))
    lean = model(ids, model.init_state(2, dtype=torch.float64), collect_aux=False)
    assert full.aux_losses and full.stats
    assert lean.aux_losses == {} and lean.stats == {}
    torch.testing.assert_close(lean.logits, full.logits, rtol=0, atol=0)
    nxt = torch.randint(0, 40, (2, 3))
    torch.testing.assert_close(model(nxt, lean.state).logits, model(nxt, full.state).logits, rtol=0, atol=0)


def test_generate_is_greedy_argmax_of_the_full_forward():
    model = every_component_model()
    prompt = torch.randint(0, 40, (1, 7))
    tokens = torch.cat(list(model.generate(prompt, 12, temperature=0)))
    sequence = torch.cat([prompt[0], tokens])
    expected = model(sequence[None, :-1]).logits[0, prompt.shape[1] - 1 :].argmax(-1)
    assert torch.equal(tokens, expected)


def test_a_step_that_differs_from_forward_is_caught(monkeypatch):
    """The parity checks fail for a component whose step drifts from its forward (here by 1e-3 per token)."""
    import hydra_kit.model
    from hydra_kit.registry import ComponentEntry, Registry

    with pytest.raises(ConformanceError, match=r"step-by-step \(batch 2\) differs from the full forward by 1\.000e-03"):
        check_component(StepDriftMixer)
    registry = Registry(dict(hydra_kit.model.default_registry().entries))
    registry.entries["drift"] = ComponentEntry("drift", StepDriftMixer, "hydra-kit-tests", "0", "fake_components:StepDriftMixer")
    monkeypatch.setattr(hydra_kit.model, "default_registry", lambda third_party=None: registry)
    torch.manual_seed(0)
    components = {"drift": {"component": "drift"}, "mlp": {"component": "mlp"}}
    model = HydraLM(vocab_size=40, d_model=32, n_blocks=1, components=components).double().eval()
    ids = torch.randint(0, 40, (1, 12))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(decode_logits(model, ids, 3, collect_aux=False), model(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_generate_cli_streams_text_from_a_text_recipe_checkpoint(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat. " * 200)
    torch.manual_seed(0)
    model = HydraLM(vocab_size=256, d_model=32, n_blocks=3, components=copy.deepcopy(EVERY_COMPONENT))
    data = TextDataModule(path=str(corpus), seq_len=32, batch_size=4)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=1)
    trainer.fit(model, data)
    ckpt = tmp_path / "text.ckpt"
    trainer.save_checkpoint(ckpt)
    result = run_cli("generate", "--ckpt_path", str(ckpt), "--prompt", "The cat", "--max_new_tokens", "20", "--temperature", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # Greedy generation is deterministic: the CLI prints exactly the model's own greedy continuation.
    model.eval()
    expected = torch.cat(list(model.generate(torch.tensor([list(b"The cat")]), 20, temperature=0))).tolist()
    assert result.stdout.rstrip("\n") == bytes(expected).decode("utf-8", errors="replace")
    bad = run_cli("generate", "--ckpt_path", str(ckpt), "--prompt-ids", "300", cwd=tmp_path)
    assert bad.returncode != 0 and "outside the model's vocabulary [0, 256)" in bad.stderr


def test_a_router_without_the_collect_aux_keyword_still_works(monkeypatch):
    """``collect_aux`` is an optional keyword of ``RouterComponent.route``: routers written without it keep working."""
    import hydra_kit.model
    from hydra_kit.components.router import TokenRouter
    from hydra_kit.protocol import RouterOutput
    from hydra_kit.registry import ComponentEntry, Registry

    class PlainRouter(TokenRouter):
        def route(self, x: torch.Tensor) -> RouterOutput:  # type: ignore[override]
            return super().route(x)

    registry = Registry(dict(hydra_kit.model.default_registry().entries))
    registry.entries["plain_router"] = ComponentEntry("plain_router", PlainRouter, "hydra-kit-tests", "0", "test_generate:PlainRouter")
    monkeypatch.setattr(hydra_kit.model, "default_registry", lambda third_party=None: registry)
    components = {**copy.deepcopy(EVERY_COMPONENT), "router": {"component": "plain_router", "blocks": "all"}}
    torch.manual_seed(0)
    model = HydraLM(vocab_size=40, d_model=32, n_blocks=3, components=components).double().eval()
    check_component(PlainRouter)
    ids = torch.randint(0, 40, (1, 20))
    torch.testing.assert_close(decode_logits(model, ids, 4, collect_aux=False), model(ids).logits, rtol=0, atol=1e-10)


def test_recurrent_state_size_does_not_grow_with_the_prompt() -> None:
    # Counted per storage (hydra_kit.accounting.state_nbytes): a state that kept a slice of the prompt's activations
    # (the workspace's pending tokens once did, 33 MB after a 16K prompt) would grow with the prompt length.
    from hydra_kit.accounting import state_nbytes

    components = {
        "ssm": {"component": "ssm", "args": {"d_state": 8, "headdim": 8, "chunk_size": 8}},
        "workspace": {"component": "workspace", "args": {"n_slots": 4, "chunk_size": 8}},
        "pkm": {"component": "pkm", "args": {"heads": 2, "n_keys": 8, "top_k": 4, "d_key": 8}},
        "router": {"component": "router"},
    }
    model = HydraLM(vocab_size=40, d_model=32, n_blocks=2, components=components).eval()
    sizes = []
    for length in (36, 396):
        ids = torch.randint(0, 40, (1, length))
        with torch.inference_mode():
            sizes.append(state_nbytes(model(ids, model.init_state(1), collect_aux=False).state))
    assert sizes[0] == sizes[1] > 0
