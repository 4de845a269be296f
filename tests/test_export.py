"""`hydra-kit export` and `HydraNetwork.from_pretrained`: exact reload without Lightning, the tokenizer, one-line refusals."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fake_components import CumulativeMeanMixer
from support import EVERY_COMPONENT

from hydra_kit.checkpoint import AtomicCheckpointIO, load_model
from hydra_kit.cli import main
from hydra_kit.codec import EOS_TOKEN, ByteCodec, HFTokenizerCodec, file_sha256
from hydra_kit.export import CONFIG_FILE, WEIGHTS_FILE, ExportError, read_config, save_pretrained, split_hparams
from hydra_kit.model import HydraLM
from hydra_kit.network import HydraNetwork
from hydra_kit.registry import ComponentEntry, Registry, default_registry


def save_ckpt(model: HydraLM, path: Path, **extra: object) -> Path:
    """A checkpoint as hydra-kit fit writes it (digest included), with extra top-level keys (data module states)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), **extra}, path)
    return path


def every_component_lm(vocab_size: int = 40, tie_embeddings: bool = True) -> HydraLM:
    torch.manual_seed(0)
    model = HydraLM(vocab_size=vocab_size, d_model=32, n_blocks=3, components=copy.deepcopy(EVERY_COMPONENT), tie_embeddings=tie_embeddings)
    with torch.no_grad():  # weights away from their initial values, so a reload that re-initialised would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def export_cli(ckpt: Path, out: Path, *extra: str) -> int:
    return main(["export", "--ckpt_path", str(ckpt), "--out", str(out), *extra])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def train_bpe(folder: Path, text: str, vocab_size: int = 300) -> Path:
    """A byte-level BPE with <|endoftext|> as id 0, saved as folder/tokenizer.json (as hydra-kit prepare makes one)."""
    tk = pytest.importorskip("tokenizers")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    path.write_text(tokenizer.to_str(), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- exact reload
@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_export_reloads_the_checkpoints_network_exactly(tmp_path, tie_embeddings):
    ckpt = save_ckpt(every_component_lm(tie_embeddings=tie_embeddings), tmp_path / "model.ckpt")
    assert export_cli(ckpt, tmp_path / "export") == 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no tokenizer: token ids
    reloaded = HydraNetwork.from_pretrained(tmp_path / "export")
    original, _ = load_model(ckpt)
    original.eval()
    assert (reloaded.head is None) == tie_embeddings  # tied weights stay tied: one matrix, not two copies
    ids = torch.randint(0, 40, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert not reloaded.training
    config = json.loads((tmp_path / "export" / CONFIG_FILE).read_text())
    assert config["vocab_size"] == 40 and config["tokenizer"] is None
    assert config["model"]["components"] == EVERY_COMPONENT and config["model"]["tie_embeddings"] is tie_embeddings
    assert config["training"]["lr"] == original.hparams["lr"]
    assert config["components"]["sga"] == {
        "component": "sga", "class": "hydra_kit.components.sga:SparseGlobalAttention", "distribution": "hydra-kit", "version": config["hydra_kit_version"],
    }
    assert config["weights"]["parameters"] == sum(p.numel() for p in original.parameters())


def test_from_pretrained_keeps_the_callers_random_stream(tmp_path):
    network = HydraNetwork(vocab_size=16, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp"}})
    model_config, _ = split_hparams(HydraNetwork, {"vocab_size": 16, "d_model": 16, "n_blocks": 1, "components": {"mlp": {"component": "mlp"}}})
    save_pretrained(network, tmp_path / "e", model_config=model_config)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    HydraNetwork.from_pretrained(tmp_path / "e")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_from_pretrained_imports_no_lightning(tmp_path):
    ckpt = save_ckpt(every_component_lm(), tmp_path / "model.ckpt")
    assert export_cli(ckpt, tmp_path / "export") == 0
    ids = torch.randint(0, 40, (1, 23))
    original, _ = load_model(ckpt)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": original.eval()(ids).logits}, tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from hydra_kit.network import HydraNetwork\n"
        f"net = HydraNetwork.from_pretrained({str(tmp_path / 'export')!r})\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(net(expected['ids']).logits, expected['logits'], rtol=0, atol=0)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- the tokenizer
def run_folder(tmp_path: Path, model: HydraLM, data: dict, **extra: object) -> Path:
    """runs/x/version_0/{config.yaml, checkpoints/last.ckpt}, as hydra-kit fit leaves a run."""
    version = tmp_path / "runs" / "x" / "version_0"
    version.mkdir(parents=True)
    (version / "config.yaml").write_text(yaml.safe_dump({"model": dict(model.hparams), "data": data}))
    return save_ckpt(model, version / "checkpoints" / "last.ckpt", **extra)


def test_a_byte_level_run_exports_the_bytes_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = HydraLM(vocab_size=256, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp"}})
    ckpt = run_folder(tmp_path, model, {"class_path": "hydra_kit.data.TextDataModule", "init_args": {"path": "corpus.txt"}})
    assert export_cli(ckpt, tmp_path / "export") == 0
    config = read_config(tmp_path / "export")
    assert config is not None and config["tokenizer"] == "bytes" and config["eos_id"] is None
    assert not (tmp_path / "export" / "tokenizer.json").exists()
    # Without a run folder, the data module state Lightning keeps in the checkpoint tells the same.
    bare = save_ckpt(model, tmp_path / "bare.ckpt", TextDataModule={"seed": 0, "num_bytes": 10, "seq_len": 8})
    assert export_cli(bare, tmp_path / "export2") == 0
    assert read_config(tmp_path / "export2")["tokenizer"] == "bytes"  # type: ignore[index]


@pytest.mark.slow
def test_a_shard_run_exports_its_tokenizer_and_generate_decodes_through_it(tmp_path, capsys, monkeypatch):
    text = "the cat sat on the mat. the dog sat on the log. " * 20
    shards = tmp_path / "data" / "shards"
    tokenizer_file = train_bpe(shards, text)
    codec = HFTokenizerCodec(tokenizer_file)
    meta = {"format": "hydra-kit-token-shards", "vocab_size": codec.vocab_size, "eos_id": 0,
            "tokenizer": {"kind": "bpe", "file": "tokenizer.json", "sha256": file_sha256(tokenizer_file)}}
    (shards / "meta.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    model = HydraLM(vocab_size=codec.vocab_size, d_model=16, n_blocks=2, components={"ssm": {"component": "ssm", "args": {"d_state": 8, "headdim": 8, "chunk_size": 4}}, "mlp": {"component": "mlp"}})
    state = {"ShardDataModule": {"seed": 0, "seq_len": 16, "num_tokens": 100, "tokenizer_sha256": meta["tokenizer"]["sha256"]}}
    # The run's config names the shard folder relative to where training ran (tmp_path, above runs/).
    ckpt = run_folder(tmp_path, model, {"class_path": "hydra_kit.data.ShardDataModule", "init_args": {"path": "data/shards"}}, **state)
    monkeypatch.chdir(tmp_path / "runs")  # not where training ran: the path is found from the run folder upwards
    assert export_cli(ckpt, tmp_path / "export") == 0
    capsys.readouterr()
    export = tmp_path / "export"
    assert (export / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    config = read_config(export)
    assert config is not None and config["tokenizer"] == "tokenizer.json" and config["eos_id"] == 0
    # generate --model decodes the model's own greedy continuation through the tokenizer.
    assert main(["generate", "--model", str(export), "--prompt", "the cat", "--max_new_tokens", "12", "--temperature", "0", "--ignore_eos"]) == 0
    out = capsys.readouterr().out
    network = HydraNetwork.from_pretrained(export)
    tokens = torch.cat(list(network.generate(torch.tensor([codec.encode("the cat")]), 12, temperature=0))).tolist()
    assert out == codec.decode(tokens) + "\n"
    # The same tokenizer spelled differently (another JSON layout) is accepted; another tokenizer is refused.
    respelled = tmp_path / "respelled" / "tokenizer.json"
    respelled.parent.mkdir()
    respelled.write_text(json.dumps(json.loads(tokenizer_file.read_text()), indent=4))
    assert export_cli(ckpt, tmp_path / "export2", "--tokenizer", str(respelled)) == 0
    capsys.readouterr()
    other = train_bpe(tmp_path / "other", "completely different words here " * 10, vocab_size=280)
    assert export_cli(ckpt, tmp_path / "export3", "--tokenizer", str(other)) == 2
    assert "not the tokenizer checkpoint" in error_line(capsys)


def test_a_shard_run_whose_tokenizer_cannot_be_found_asks_for_it(tmp_path, capsys):
    torch.manual_seed(0)
    model = HydraLM(vocab_size=300, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp"}})
    ckpt = save_ckpt(model, tmp_path / "bare.ckpt", ShardDataModule={"seed": 0, "tokenizer_sha256": "0" * 64})
    assert export_cli(ckpt, tmp_path / "export") == 2
    assert "pass --tokenizer" in error_line(capsys)
    assert not (tmp_path / "export").exists()
    assert export_cli(ckpt, tmp_path / "export", "--tokenizer", "bytes") == 0
    assert read_config(tmp_path / "export")["tokenizer"] == "bytes"  # type: ignore[index]


# ---------------------------------------------------------------------------------------------- refusals
def test_an_existing_folder_is_replaced_only_with_force(tmp_path, capsys):
    ckpt = save_ckpt(every_component_lm(), tmp_path / "model.ckpt")
    out = tmp_path / "export"
    assert export_cli(ckpt, out) == 0
    capsys.readouterr()
    assert export_cli(ckpt, out) == 2
    assert f"--out {out}: already exists; pass --force" in error_line(capsys)
    (out / "stale.txt").write_text("from an older export")
    assert export_cli(ckpt, out, "--force") == 0
    assert not (out / "stale.txt").exists() and (out / WEIGHTS_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    capsys.readouterr()
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    assert export_cli(ckpt, project, "--force") == 2
    assert "holds files but no hydra-kit export" in error_line(capsys)
    assert (project / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE, "tokenizer.json"])
def test_an_export_with_a_missing_file_is_one_line_naming_it(tmp_path, capsys, missing):
    torch.manual_seed(0)
    model = HydraLM(vocab_size=300, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp"}})
    train_bpe(tmp_path / "tok", "some words to merge " * 10)
    ckpt = save_ckpt(model, tmp_path / "model.ckpt")
    assert export_cli(ckpt, tmp_path / "export", "--tokenizer", str(tmp_path / "tok")) == 0
    (tmp_path / "export" / missing).unlink()
    with pytest.raises(ExportError, match=f"the export is incomplete: {missing} is missing"):
        HydraNetwork.from_pretrained(tmp_path / "export")
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "export"), "--prompt", "hi"]) == 2
    assert f"{missing} is missing" in error_line(capsys)


def test_damaged_weights_are_refused(tmp_path):
    ckpt = save_ckpt(every_component_lm(), tmp_path / "model.ckpt")
    assert export_cli(ckpt, tmp_path / "export") == 0
    weights = tmp_path / "export" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="damaged: its SHA-256 differs"):
        HydraNetwork.from_pretrained(tmp_path / "export")


def test_an_export_needing_a_plugin_that_is_not_installed_is_refused_naming_it(tmp_path, capsys):
    registry = Registry(dict(default_registry().entries))
    registry.entries["cummean"] = ComponentEntry("cummean", CumulativeMeanMixer, "hydra-kit-cummean", "0.3", "fake_components:CumulativeMeanMixer")
    spec = {"vocab_size": 16, "d_model": 16, "n_blocks": 1, "components": {"mean": {"component": "cummean"}, "mlp": {"component": "mlp"}}}
    network = HydraNetwork(**spec, registry=registry)  # type: ignore[arg-type]
    model_config, _ = split_hparams(HydraNetwork, spec)
    save_pretrained(network, tmp_path / "export", model_config=model_config)
    # The registry it was exported with loads it ...
    reloaded = HydraNetwork.from_pretrained(tmp_path / "export", registry=registry)
    ids = torch.randint(0, 16, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, network.eval()(ids).logits, rtol=0, atol=0)
    # ... the installed one, without the plugin, refuses it in one line naming the plugin and its distribution.
    with pytest.raises(ExportError, match=r"component instance 'mean' needs the plugin 'cummean' .*hydra-kit-cummean 0\.3, which is not available: install it: pip install 'hydra-kit-cummean==0\.3'"):
        HydraNetwork.from_pretrained(tmp_path / "export")
    assert main(["generate", "--model", str(tmp_path / "export"), "--prompt-ids", "1"]) == 2
    assert "hydra-kit-cummean" in error_line(capsys)


def test_export_refuses_a_tokenizer_larger_than_the_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = HydraLM(vocab_size=200, d_model=16, n_blocks=1, components={"mlp": {"component": "mlp"}})
    ckpt = save_ckpt(model, tmp_path / "model.ckpt")
    assert export_cli(ckpt, tmp_path / "export", "--tokenizer", "bytes") == 2
    assert "it has 256 token ids but the model only 200" in error_line(capsys)
    assert not (tmp_path / "export").exists()


def test_the_byte_codec_round_trips_and_shows_ids_beyond_the_bytes():
    codec = ByteCodec(eos_id=256)
    text = "héllo ✓"
    assert codec.decode(codec.encode(text)) == text
    assert codec.decode([*codec.encode("a"), 256]) == "a"  # the end-of-document id renders as nothing
    assert ByteCodec().decode([104, 300]) == "h300 "
    cut = codec.encode("✓")[:2]  # a character cut short comes out as U+FFFD, as a whole decode gives it
    assert codec.decode(cut) == bytes(cut).decode("utf-8", errors="replace")


def test_the_tokenizer_decoder_streams_text_equal_to_a_whole_decode(tmp_path):
    codec = HFTokenizerCodec(train_bpe(tmp_path, "naïve café déjà vu ✓✓ " * 10))
    ids = codec.encode("café ✓ déjà naïve vu")
    decoder = codec.decoder()
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == codec.tokenizer.decode(ids) == "café ✓ déjà naïve vu"
    # A literal "<|endoftext|>" in a prompt is text, not the end-of-document id.
    assert codec.eos_id == 0 and 0 not in codec.encode(f"a {EOS_TOKEN} b")


def test_export_refuses_an_unknown_option_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's refusal: one line, then SystemExit(2)
        main(["export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "out"), "--no-such-option", "1"])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "--no-such-option" in line and "hydra-kit export" in line
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_json_without_the_tokenizers_package_names_the_text_extra(tmp_path, monkeypatch):
    from hydra_kit.codec import TokenizerError

    path = train_bpe(tmp_path, "a few words " * 5)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what an install without the `text` extra sees
    with pytest.raises(TokenizerError, match=r"needs the package 'tokenizers': pip install 'hydra-kit\[text\]'"):
        HFTokenizerCodec(path)


@pytest.mark.slow
def test_a_model_trained_on_prepared_bpe_shards_exports_and_generates_through_their_tokenizer(tmp_path, capsys):
    import lightning as L

    from hydra_kit.data.prepare import prepare
    from hydra_kit.data.shards import ShardDataModule

    pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: the cat sat on the mat, and the dog sat on the log. " * 8, encoding="utf-8")
    meta = prepare(corpus, tmp_path / "shards", vocab_size=300, val_fraction=0.34)
    torch.manual_seed(0)
    model = HydraLM(vocab_size=meta["vocab_size"], d_model=16, n_blocks=2, components={"ssm": {"component": "ssm", "args": {"d_state": 8, "headdim": 8, "chunk_size": 4}}, "mlp": {"component": "mlp"}})
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=1)
    trainer.fit(model, ShardDataModule(path=str(tmp_path / "shards"), seq_len=16, batch_size=2))
    # The run folder hydra-kit fit leaves: its config.yaml names the data module and the shard folder.
    version = tmp_path / "runs" / "bpe" / "version_0"
    trainer.save_checkpoint(version / "checkpoints" / "last.ckpt")
    (version / "config.yaml").write_text(yaml.safe_dump({"data": {"class_path": "hydra_kit.data.ShardDataModule", "init_args": {"path": str(tmp_path / "shards")}}}))
    assert export_cli(version / "checkpoints" / "last.ckpt", tmp_path / "export") == 0
    config = read_config(tmp_path / "export")
    assert config is not None and config["tokenizer"] == "tokenizer.json" and config["eos_id"] == meta["eos_id"]
    network = HydraNetwork.from_pretrained(tmp_path / "export")
    ids = torch.randint(0, meta["vocab_size"], (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(network(ids).logits, model.eval().network(ids).logits, rtol=0, atol=0)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "export"), "--prompt", "the cat", "--max_new_tokens", "8", "--temperature", "0", "--ignore_eos"]) == 0
    codec = HFTokenizerCodec(tmp_path / "export" / "tokenizer.json")
    tokens = torch.cat(list(network.generate(torch.tensor([codec.encode("the cat")]), 8, temperature=0))).tolist()
    assert capsys.readouterr().out == codec.decode(tokens) + "\n"


def test_the_end_of_document_token_is_the_one_prepare_writes():
    from hydra_kit.codec import EOS_TOKEN as CODEC_EOS
    from hydra_kit.data.tokenizer import EOS_TOKEN as PREPARE_EOS

    assert CODEC_EOS == PREPARE_EOS
