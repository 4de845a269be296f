"""HydraLM and the tri-path block: assembly, LayerScale, gating, chunked forward, router skipping, checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hydra_kit.data import MQAR, SyntheticDataModule
from hydra_kit.model import HydraLM
from hydra_kit.recipe import RecipeError

GATED = {
    "attn": {"component": "attention", "args": {"n_heads": 2}, "blocks": "all"},
    "mlp": {"component": "mlp", "blocks": "all"},
    "router": {"component": "router", "blocks": "all"},
}


def small_model(components=None, **kwargs) -> HydraLM:
    torch.manual_seed(0)
    return HydraLM(vocab_size=40, d_model=32, n_blocks=2, components=copy.deepcopy(components or GATED), **kwargs)


def test_forward_shapes_aux_and_stats():
    model = small_model()
    out = model(torch.randint(0, 40, (3, 11)))
    assert out.logits.shape == (3, 11, 40)
    assert set(out.aux_losses) == {"router.budget"}
    assert {"router.gate_attn", "router.gate_mlp"} <= set(out.stats)
    assert all(v.dim() == 0 for v in [*out.aux_losses.values(), *out.stats.values()])


def test_layout_places_components_and_layerscale_defaults():
    comps = {**GATED, "attn": {"component": "attention", "args": {"n_heads": 2}, "blocks": [1], "layerscale": 0.3}}
    model = small_model(comps)
    assert list(model.blocks[0].mixers) == ["mlp"]
    assert list(model.blocks[1].mixers) == ["attn", "mlp"]
    assert model.blocks[1].layerscale["attn"].item() == pytest.approx(0.3)
    assert model.blocks[1].layerscale["mlp"].item() == pytest.approx(1.0)
    assert model.blocks[0].router is not None and model.blocks[0].gate_index == {"mlp": 0}


def test_tied_head():
    model = small_model()
    parts = [model.embed, model.norm, *model.blocks]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for m in parts for p in m.parameters())
    assert not any(p.shape == (40, 32) for n, p in model.named_parameters() if "embed" not in n)


def test_untied_head_has_its_own_matrix_counted_once():
    tied, untied = small_model(), small_model(tie_embeddings=False)
    assert untied.head is not None and untied.head.weight.shape == (40, 32)
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + 40 * 32
    report = untied.parameter_report(16)
    assert report["head_params"] == 40 * 32 and tied.parameter_report(16)["head_params"] == 0
    assert report["total_params"] == sum(p.numel() for p in untied.parameters())
    assert report["active_params"] == tied.parameter_report(16)["active_params"] + 40 * 32
    # The logits come from the head, not the embedding: zeroing the head zeroes them.
    with torch.no_grad():
        untied.head.weight.zero_()
    assert untied(torch.randint(0, 40, (2, 5))).logits.abs().max() == 0


def test_chunked_model_forward_equals_full():
    model = small_model().double().eval()
    ids = torch.randint(0, 40, (2, 17))
    full = model(ids).logits
    state = model.init_state(2, dtype=torch.float64)
    pieces = []
    for a, b in ((0, 5), (5, 6), (6, 17)):
        out = model(ids[:, a:b], state)
        pieces.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)


def test_dropped_component_is_absent():
    model = small_model(dropped=["attn"])
    assert not any("attn" in n for n, _ in model.named_parameters())
    with pytest.raises(RecipeError, match="'nope' is not a component instance"):
        small_model(dropped=["nope"])


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_block_weights_each_gated_update_by_layerscale_gain_and_gate(gain):
    comps = copy.deepcopy(GATED)
    comps["router"]["args"] = {"gate_gain": gain}
    block = small_model(comps).blocks[0]
    x = torch.randn(2, 7, 32)
    u = block.norm(x)
    gates = block.router.route(u).gates  # (B, L, G)
    expected = x.clone()
    for name, component in block.mixers.items():
        weight = block.layerscale[name] * gain * gates[..., block.gate_index[name], None]
        expected = expected + weight * component(u).update
    torch.testing.assert_close(block(x).hidden, expected)
    # The one-token decoding path applies the same gain.
    state = block.init_state(2, device=x.device, dtype=x.dtype)
    with torch.inference_mode():
        stepped = block(x[:, :1], state, collect_aux=False).hidden
    torch.testing.assert_close(stepped, expected[:, :1], rtol=1e-5, atol=1e-6)


def test_router_starts_as_a_pass_through_by_default():
    block = small_model().blocks[0]
    gates = block.router.route(block.norm(torch.randn(2, 5, 32))).gates
    assert block.router.gate_gain == 2.0
    torch.testing.assert_close(block.router.gate_gain * gates, torch.ones_like(gates), atol=0.05, rtol=0)


def _set_threshold(model: HydraLM, threshold: float) -> None:
    for block in model.blocks:
        block.router.gate_threshold = threshold


def test_gate_threshold_zero_equals_soft_gating():
    model = small_model().eval()
    ids = torch.randint(0, 40, (2, 9))
    soft = model(ids).logits
    _set_threshold(model, 0.0)
    torch.testing.assert_close(model(ids).logits, soft)
    _set_threshold(model, 1e-12)  # every token kept: the gather path must give the same result
    torch.testing.assert_close(model(ids).logits, soft, rtol=1e-5, atol=1e-6)


def test_gate_threshold_skips_tokens_and_work():
    model = small_model().eval()
    ids = torch.randint(0, 40, (4, 32))
    seen: list[int] = []
    model.blocks[0].mixers["mlp"].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0] * args[0].shape[1]))
    with FlopCounterMode(display=False) as soft_counter:
        model(ids)
    gates = model.blocks[0].router.route(model.blocks[0].norm(model.embed(ids))).gates[..., model.blocks[0].gate_index["mlp"]]
    threshold = float(gates.detach().median())
    _set_threshold(model, threshold)
    with FlopCounterMode(display=False) as sparse_counter:
        model(ids)
    kept = int((gates >= threshold).sum())
    assert seen == [4 * 32, kept] and 0 < kept < 4 * 32
    assert sparse_counter.get_total_flops() < 0.9 * soft_counter.get_total_flops()


def test_a_model_trained_to_skip_decodes_as_it_runs_whole_sequences():
    """Every first-party gated component under a threshold that skips in training too: the whole-sequence forward,
    chunks with carried state and one-token decoding agree (steps where no token of the batch is kept included),
    and training reaches every parameter the kept tokens use."""
    import yaml

    from hydra_kit.recipe_files import resolve_config

    components = yaml.safe_load(Path(resolve_config("full")).read_text())["model"]["components"]
    components["router"]["args"] = {"gate_threshold": 0.5, "skip_in_training": True}
    torch.manual_seed(0)
    model = HydraLM(vocab_size=72, d_model=96, n_blocks=6, components=components)
    ids = torch.randint(0, 72, (2, 40))
    out = model(ids)
    kept = {k: float(v) for k, v in out.stats.items() if ".kept_" in k}
    assert set(kept) == {"router.kept_sga", "router.kept_moe", "router.kept_workspace", "router.kept_pkm"}
    assert all(0.2 < v < 0.8 for v in kept.values())  # untrained gates sit near 0.5: about half of the tokens
    (out.logits.logsumexp(-1).mean() + sum(out.aux_losses.values())).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "score_proj" not in n)
    model.eval()
    with torch.no_grad():
        whole = model(ids).logits
        state = model.network.init_state(2)
        steps = []
        for t in range(ids.shape[1]):
            stepped = model.network(ids[:, t : t + 1], state=state, collect_aux=False)
            steps.append(stepped.logits)
            state = stepped.state
        first = model.network(ids[:, :13], state=model.network.init_state(2))
        second = model.network(ids[:, 13:], state=first.state)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-4, atol=1e-4)


def test_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"model\.components\.attn\.component: unknown component 'atention'.*available:.*attention"):
        small_model({"attn": {"component": "atention"}})
    with pytest.raises(RecipeError, match=r"model\.components\.attn\.args: unknown argument\(s\) 'heads'.*valid: n_heads, rope_base"):
        small_model({"attn": {"component": "attention", "args": {"heads": 2}}})
    with pytest.raises(RecipeError, match=r"model\.components\.attn\.blocks: block index 5 is out of range"):
        small_model({"attn": {"component": "attention", "args": {"n_heads": 2}, "blocks": [5]}})
    with pytest.raises(RecipeError, match=r"model\.components\.attn\.args: CausalSelfAttention rejected.*n_heads"):
        small_model({"attn": {"component": "attention", "args": {"n_heads": "two"}}})
    with pytest.raises(RecipeError, match=r"n_heads=3 must be positive and divide d_model=32"):
        small_model({"attn": {"component": "attention", "args": {"n_heads": 3}}})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) 'block'"):
        small_model({"attn": {"component": "attention", "block": [0]}})


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_round_trip(tmp_path, tie):
    model = small_model(tie_embeddings=tie)
    data = SyntheticDataModule(task=MQAR(num_pairs=4, num_queries=4, num_keys=16, num_values=16), batch_size=8, train_size=64, val_size=16)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=1)
    trainer.fit(model, data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = HydraLM.load_from_checkpoint(path, weights_only=True)
    ids = torch.randint(0, 40, (2, 9))
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_vocab_smaller_than_task_is_explained():
    model = HydraLM(vocab_size=10, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp"}})
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(RecipeError, match=r"model\.vocab_size is 10 but the data uses \d+ token ids"):
        trainer.fit(model, SyntheticDataModule(batch_size=2, train_size=4, val_size=2))


@pytest.mark.slow
def test_sparse_pkm_values_train_with_dense_sparse_adam():
    comps = {"mlp": {"component": "mlp"}, "pkm": {"component": "pkm", "blocks": [1], "args": {"n_keys": 8, "top_k": 4, "heads": 2, "d_key": 16, "sparse_values": True}}}
    model = small_model(comps)
    data = SyntheticDataModule(task=MQAR(num_pairs=4, num_queries=4, num_keys=16, num_values=16), batch_size=8, train_size=64, val_size=16)
    values = model.blocks[1].mixers["pkm"].values.weight
    before = values.detach().clone()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=1)
    trainer.fit(model, data)
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "DenseSparseAdam" and optimizer.sparse is not None
    changed_rows = (values.detach() != before).any(dim=1)
    assert 0 < int(changed_rows.sum()) < values.shape[0]  # SparseAdam touched only the rows that were read
    optimizer.load_state_dict(optimizer.state_dict())  # round trip through a checkpoint-shaped dict


def test_token_by_token_decoding_matches_full_forward():
    model = small_model().double().eval()
    ids = torch.randint(0, 40, (2, 14))
    full = model(ids).logits
    out = model(ids[:, :5], model.init_state(2, dtype=torch.float64))
    logits, state = [out.logits], out.state
    for t in range(5, 14):
        out = model(ids[:, t : t + 1], state)
        logits.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=0, atol=1e-10)


# --------------------------------------------------------- the plain network beside the LightningModule
@pytest.mark.slow
def test_network_builds_and_generates_without_lightning():
    """HydraNetwork is a plain nn.Module: building it, a forward and generation import no Lightning."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from hydra_kit.network import HydraNetwork\n"
        "net = HydraNetwork(vocab_size=16, d_model=16, n_blocks=2, components={'ssm': {'component': 'ssm', 'args': {'d_state': 8, 'headdim': 8, 'chunk_size': 4}}, 'mlp': {'component': 'mlp'}})\n"
        "ids = torch.randint(0, 16, (2, 5))\n"
        "assert net(ids).logits.shape == (2, 5, 16)\n"
        "tokens = torch.stack(list(net.generate(ids, 4, temperature=0)), 1)\n"
        "assert tokens.shape == (2, 4)\n"
        "logits, state = net.step(tokens[:, -1], net.init_state(2))\n"
        "assert logits.shape == (2, 16)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_lightning_module_delegates_to_its_network():
    model = small_model()
    ids = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(model(ids).logits, model.network(ids).logits)
    assert model.blocks is model.network.blocks and model.embed is model.network.embed
    assert model.parameter_report(16) == model.network.parameter_report(16)
    assert {n for n, _ in model.named_parameters()} == {f"network.{n}" for n, _ in model.network.named_parameters()}


def test_checkpoint_written_before_the_network_split_loads():
    """Checkpoints keyed ``embed.weight``, ``blocks.0...`` (HydraLM before it held a network) load unchanged."""

    model = small_model()
    old = {k.removeprefix("network."): v for k, v in model.state_dict().items()}
    assert "embed.weight" in old and "blocks.0.norm.weight" in old
    fresh = HydraLM(**model.hparams)
    fresh.load_state_dict(old)  # strict: every key found, none unexpected
    ids = torch.randint(0, 40, (1, 9))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    with pytest.raises(RuntimeError, match="Missing key"):
        HydraLM(**model.hparams).load_state_dict({k: v for k, v in old.items() if not k.startswith("norm.")})


def test_checkpoint_file_written_before_the_network_split_loads(tmp_path):
    from hydra_kit.checkpoint import AtomicCheckpointIO, load_model

    model = small_model()
    old = {k.removeprefix("network."): v for k, v in model.state_dict().items()}
    path = tmp_path / "old.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": old, "hyper_parameters": dict(model.hparams)}, path)
    loaded, _ = load_model(path)
    ids = torch.randint(0, 40, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


# ------------------------------------------------------------------ the instance API callbacks use
def test_instance_api_disables_enables_freezes_and_names_unknown_instances():
    model = small_model()
    network = model.network
    assert network.instance_names == ("attn", "mlp", "router") and network.router_names == {"router"}
    network.disable(["attn"])
    assert network.knocked_out == {"attn"} and all(b.knocked_out == {"attn"} for b in model.tri_path_blocks)
    network.disable(["mlp"])
    network.enable(["attn"])
    assert network.knocked_out == {"mlp"}
    network.set_knocked_out([])
    assert network.knocked_out == frozenset()
    network.freeze(["router", "mlp"])
    assert not any(p.requires_grad for p in network.instance_parameters("router"))
    assert not any(p.requires_grad for p in network.instance_parameters("mlp"))
    assert all(p.requires_grad for p in network.instance_parameters("attn"))
    network.unfreeze(["mlp"])
    assert all(p.requires_grad for p in network.instance_parameters("mlp"))
    with pytest.raises(RecipeError, match=r"knock-out: unknown component instance\(s\) \['router'\]; instances: attn, mlp"):
        network.disable(["router"])  # a block has no path without its router
    with pytest.raises(RecipeError, match=r"freeze: unknown component instance\(s\) \['pkm'\]; instances: attn, mlp, router"):
        network.freeze(["pkm"])


# ------------------------------------------------------------------ the data-module protocol
def test_a_data_module_without_the_protocol_is_named_in_one_line():
    from hydra_kit.data import TokenData

    class NoLength(L.LightningDataModule):
        vocab_size = 40

        def train_dataloader(self):  # type: ignore[no-untyped-def]
            return torch.utils.data.DataLoader([{"input_ids": torch.zeros(4, dtype=torch.long), "targets": torch.zeros(4, dtype=torch.long)}])

    assert isinstance(SyntheticDataModule(MQAR(num_pairs=2, num_queries=2)), TokenData)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RecipeError, match=r"^data: NoLength lacks seq_len that HydraLM needs \(the protocol hydra_kit\.data\.TokenData"):
        trainer.fit(small_model(), datamodule=NoLength())


def test_optimizer_option_is_refused_in_one_line(tmp_path):
    """``--optimizer`` would train every parameter in one group: the CLI refuses it and names what to set."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    argv = ["fit", "--config", str(recipe), "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1", "--trainer.max_steps", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # Lightning warns that it replaces configure_optimizers
    result = subprocess.run([sys.executable, "-m", "hydra_kit.cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    err = result.stderr.strip()
    assert result.returncode == 2, err[-2000:]
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: --optimizer: HydraLM builds its own optimizer from its parameter groups"), err
    assert "set --model.lr, --model.weight_decay" in last
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before the first step


def test_lr_scheduler_option_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """``--lr_scheduler`` alone would be ignored by LightningCLI: the CLI refuses it and names what to set."""
    from hydra_kit.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    argv = ["fit", "--config", str(recipe), "--lr_scheduler", "torch.optim.lr_scheduler.ConstantLR", "--trainer.max_steps", "2"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --lr_scheduler: HydraLM schedules its learning rate itself") and "--model.warmup_steps" in last
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before anything ran

