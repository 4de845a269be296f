"""Recurrent generation: whole-model step parity with every component, the lean decoding path, `hydra-kit generate`."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from fake_components import StepDriftMixer
from support import EVERY_COMPONENT, run_cli

from hydra_kit.data import TextDataModule
from hydra_kit.model import HydraLM
from hydra_kit.testing import ConformanceError, check_component


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


# ------------------------------------------------------------------------------ sampling options and batches
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    from hydra_kit.sampling import top_p_filter

    # Sorted, the probabilities are 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0): cumulative 0.5, 0.8, 0.95, 1.
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.15, 0.5, 0.05]], dtype=torch.float64)
    logits = probs.log()
    cases = {0.2: [{1}, {2}], 0.49: [{1}, {2}], 0.51: [{1, 3}, {2, 0}], 0.79: [{1, 3}, {2, 0}], 0.81: [{1, 3, 2}, {2, 0, 1}], 0.96: [{0, 1, 2, 3}] * 2, 1.0: [{0, 1, 2, 3}] * 2}
    for p, expected in cases.items():
        filtered = top_p_filter(logits, p)
        for row in range(2):
            kept = {i for i in range(4) if torch.isfinite(filtered[row, i])}
            assert kept == expected[row], (p, row, kept)
            torch.testing.assert_close(filtered[row, sorted(kept)], logits[row, sorted(kept)], rtol=0, atol=0)  # kept logits unchanged


def test_sampling_with_top_p_draws_only_from_the_nucleus():
    from hydra_kit.sampling import sample_next

    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(4000, 4)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}
    share = (draws == 1).float().mean().item()  # renormalised over the nucleus: 0.5 / 0.8
    assert abs(share - 0.625) < 0.03


def test_repetition_penalty_lowers_the_logits_of_seen_tokens_as_documented():
    from hydra_kit.sampling import apply_repetition_penalty

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    penalised = apply_repetition_penalty(logits, seen, 2.0)
    # Seen: positive logits divided by the penalty, negative ones (and zero) multiplied; unseen unchanged.
    assert penalised.tolist() == [[1.0, -2.0, 0.5, 3.0, 0.0]]
    assert (penalised[seen] <= logits[seen]).all()


def test_generate_with_a_repetition_penalty_is_greedy_over_the_penalised_logits():
    from hydra_kit.sampling import apply_repetition_penalty

    model = every_component_model()
    prompt = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(3))
    tokens = torch.cat(list(model.network.generate(prompt, 10, temperature=0, repetition_penalty=1.8)))
    sequence = torch.cat([prompt[0], tokens])
    logits = model(sequence[None, :-1]).logits[0, prompt.shape[1] - 1 :]  # (10, V): the logits each token was chosen from
    for t in range(10):
        seen = torch.zeros(1, 40, dtype=torch.bool)
        seen[0, sequence[: prompt.shape[1] + t]] = True
        assert int(apply_repetition_penalty(logits[t : t + 1], seen, 1.8).argmax()) == int(tokens[t])
    plain = torch.cat(list(model.network.generate(prompt, 10, temperature=0)))
    assert not torch.equal(plain, tokens)  # the penalty changed something (this model repeats itself greedily)


@pytest.mark.slow
def test_a_batch_of_prompts_of_different_lengths_gives_each_row_what_it_gets_alone():
    network = every_component_model().network
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 40, (n,), generator=gen) for n in (5, 9, 5, 1)]
    batch = torch.stack(list(network.generate(prompts, 14, temperature=0)), 1)  # (B, 14)
    assert batch.shape == (4, 14)
    for i, prompt in enumerate(prompts):
        alone = torch.cat(list(network.generate(prompt[None], 14, temperature=0)))
        assert torch.equal(batch[i], alone), i


@pytest.mark.slow
def test_rows_stop_at_eos_and_at_stop_sequences_and_then_yield_finished():
    from hydra_kit.sampling import FINISHED

    network = every_component_model().network
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 40, (n,), generator=gen) for n in (4, 7)]
    alone = [torch.cat(list(network.generate(p[None], 12, temperature=0))).tolist() for p in prompts]
    eos = alone[0][3]  # row 0 produces it at step 3 (or earlier)

    def cut(tokens: list[int], end: int) -> list[int]:
        return tokens[: tokens.index(eos) + 1] if eos in tokens[:end] else tokens[:end]

    steps = list(network.generate(prompts, 12, temperature=0, eos_id=eos))
    rows = torch.stack(steps, 1).tolist()
    for row, tokens in zip(rows, alone, strict=True):
        kept = cut(tokens, 12)
        assert row[: len(kept)] == kept and set(row[len(kept) :]) <= {FINISHED}
    assert len(steps) == max(len(cut(t, 12)) for t in alone)  # iteration ends once every row has stopped
    # A token-id stop sequence: row 1 stops right after its tokens 2 and 3 (as a pair).
    seq = alone[1][2:4]
    stopped = torch.stack(list(network.generate(prompts[1][None], 12, temperature=0, stop_sequences=[seq])), 1)[0].tolist()
    first = next(i for i in range(1, 12) if alone[1][i - 1 : i + 1] == seq)
    assert stopped == alone[1][: first + 1]


def test_stop_strings_cut_the_output():
    from hydra_kit.codec import ByteCodec
    from hydra_kit.generation import StopStrings, generate_text

    stopper = StopStrings(["\n\n", "END"])
    out = "".join(stopper.feed(piece) for piece in ["a\n", "b E", "N", "D tail"]) + stopper.flush()
    assert out == "a\nb " and stopper.stopped
    held = StopStrings(["END"])
    assert held.feed("xEN") == "x" and held.flush() == "EN"  # a held-back start that never became a stop string
    torch.manual_seed(0)
    network = HydraLM(vocab_size=256, d_model=32, n_blocks=2, components={"mlp": {"component": "mlp"}}).network
    (free,) = generate_text(network, ByteCodec(), ["Hello"], 24, temperature=0)
    stop = free[5:7]
    (cut,) = generate_text(network, ByteCodec(), ["Hello"], 24, temperature=0, stop=[stop])
    assert cut == free[: free.find(stop)]


@pytest.mark.slow
def test_generate_cli_batches_several_prompts_with_the_sampling_options(tmp_path, capsys):
    from hydra_kit.checkpoint import AtomicCheckpointIO
    from hydra_kit.cli import main
    from hydra_kit.codec import ByteCodec
    from hydra_kit.generation import generate_text

    torch.manual_seed(0)
    model = HydraLM(vocab_size=256, d_model=32, n_blocks=3, components=copy.deepcopy(EVERY_COMPONENT))
    ckpt = tmp_path / "bytes.ckpt"
    AtomicCheckpointIO().save_checkpoint({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, ckpt)
    args = ["generate", "--ckpt_path", str(ckpt), "--prompt", "The cat", "--prompt", "A", "--max_new_tokens", "10", "--temperature", "0"]
    assert main(args) == 0
    expected = [generate_text(model.network, ByteCodec(), [p], 10, temperature=0)[0] for p in ("The cat", "A")]
    assert capsys.readouterr().out == f"==> prompt 1 <==\n{expected[0]}\n\n==> prompt 2 <==\n{expected[1]}\n"
    assert main([*args, "--temperature", "0.8", "--top_p", "0.9", "--top_k", "50", "--repetition_penalty", "1.3", "--stop", "\n"]) == 0
    for option, message in [(["--top_p", "0"], "--top_p: expected a number in (0, 1]"), (["--repetition_penalty", "-1"], "--repetition_penalty: expected a finite number > 0")]:
        capsys.readouterr()
        assert main([*args, *option]) == 2
        assert message in capsys.readouterr().err
