"""ShardDataModule: memory-mapped windows with segment ids, a resumable shuffled stream, rank striding, clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hydra_kit.data import ShardDataModule
from hydra_kit.data.prepare import prepare
from hydra_kit.data.shards import ShardDataError, permute, segment_ids

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "wikitext-2-sample" / "valid-sample.txt"  # CC BY-SA 3.0, see its README.md


@pytest.fixture(scope="module")
def byte_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte shards of 40 short documents (several shards per split)."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"d{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 7))
    out = folder / "shards"
    prepare(folder, out, tokenizer="bytes", val_fraction=0.2, shard_tokens=1500)
    return out


def all_batches(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def test_segment_ids_open_a_new_document_after_each_eos():
    ids = torch.tensor([[5, 6, 0, 7, 0, 0, 8], [0, 1, 2, 3, 4, 5, 0]])
    assert segment_ids(ids, eos_id=0).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4097])
def test_permute_is_a_bijection_that_depends_on_seed_and_epoch(n):
    image = [permute(i, n, seed=1, epoch=0) for i in range(n)]
    assert sorted(image) == list(range(n))
    if n >= 64:
        assert image != list(range(n))
        assert image != [permute(i, n, seed=1, epoch=1) for i in range(n)] != [permute(i, n, seed=2, epoch=0) for i in range(n)]


def test_windows_are_next_token_pairs_with_segments_and_val_is_in_order(byte_shards):
    dm = ShardDataModule(str(byte_shards), seq_len=32, batch_size=4)
    meta = json.loads((byte_shards / "meta.json").read_text())
    assert dm.vocab_size == 257 and dm.eos_id == 256 and dm.seq_len == 32
    assert dm.bytes_per_token == pytest.approx(meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"])
    val = all_batches(dm.val_dataloader())
    tokens = [np.fromfile(byte_shards / s["file"], dtype=np.uint16) for s in meta["splits"]["val"]["shards"]]
    expected = [t[k * 32 : k * 32 + 33] for t in tokens for k in range((len(t) - 1) // 32)]
    got = [torch.cat([b["input_ids"][i], b["targets"][i, -1:]]).numpy() for b in val for i in range(len(b["input_ids"]))]
    assert len(got) == len(expected) and all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    for batch in val:
        assert batch["segment_ids"].shape == batch["input_ids"].shape and batch["segment_ids"].dtype == torch.int64
        assert torch.equal(batch["segment_ids"], segment_ids(batch["input_ids"], 256))
        assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])


def test_an_epoch_reads_every_window_once_and_epochs_differ(byte_shards):
    dm = ShardDataModule(str(byte_shards), seq_len=16, batch_size=1)
    epoch0, epoch1 = dm.train_windows(0), dm.train_windows(1)
    seen = sorted(tuple(epoch0[i]["input_ids"].tolist()) for i in range(len(epoch0)))
    assert seen == sorted(tuple(epoch0.window(i)[:-1].tolist()) for i in range(len(epoch0)))  # a permutation of the windows
    assert [epoch0[i]["input_ids"].tolist() for i in range(5)] != [epoch1[i]["input_ids"].tolist() for i in range(5)]


def test_resume_skips_exactly_the_consumed_batches(byte_shards):
    fresh = all_batches(ShardDataModule(str(byte_shards), seq_len=16, batch_size=4).train_dataloader())
    resumed = ShardDataModule(str(byte_shards), seq_len=16, batch_size=4)
    state = {**ShardDataModule(str(byte_shards), seq_len=16, batch_size=4).state_dict(), "epoch": 0, "batches_done": 3}
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    after = all_batches(loader)
    assert len(after) == len(fresh) - 3
    # Lightning ends the resumed epoch when its restored batch count reaches len(loader): the whole epoch's.
    assert len(loader) == len(fresh)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(after, fresh[3:], strict=True))
    assert len(all_batches(resumed.train_dataloader())) == len(fresh)  # only the first epoch after the resume skips
    other = ShardDataModule(str(byte_shards), seq_len=16, batch_size=4)  # other shards of the same tokenizer: start over
    other.load_state_dict({**state, "num_tokens": 12})
    assert len(all_batches(other.train_dataloader())) == len(fresh)


def test_ranks_stride_the_order_of_one_process(byte_shards):
    one = all_batches(ShardDataModule(str(byte_shards), seq_len=16, batch_size=4).train_dataloader())
    per_rank = []
    for rank in range(2):
        dm = ShardDataModule(str(byte_shards), seq_len=16, batch_size=2)
        dm.trainer = SimpleNamespace(current_epoch=0, world_size=2, global_rank=rank)  # type: ignore[assignment]
        per_rank.append(all_batches(dm.train_dataloader()))
    for step, batch in enumerate(one[: len(per_rank[0])]):
        interleaved = torch.stack([per_rank[i % 2][step]["input_ids"][i // 2] for i in range(4)])
        assert torch.equal(interleaved, batch["input_ids"])


def test_model_vocabulary_smaller_than_the_shards_is_one_line(byte_shards):
    dm = ShardDataModule(str(byte_shards), seq_len=16)
    with pytest.raises(ShardDataError) as exc:
        dm.check_vocab(256)
    message = str(exc.value)
    assert "\n" not in message and str(byte_shards) in message and "257 token ids" in message and "model.vocab_size is 256" in message
    assert "--model.vocab_size 257" in message
    dm.check_vocab(257)
    dm.check_vocab(320)  # a larger model vocabulary is allowed (only warned about)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(hparams={"vocab_size": 100}))  # type: ignore[assignment]
    with pytest.raises(ShardDataError, match=r"model\.vocab_size is 100"):
        dm.setup("fit")


def test_a_checkpoint_of_another_tokenizer_is_refused(byte_shards):
    dm = ShardDataModule(str(byte_shards))
    with pytest.raises(ShardDataError, match=r"not the one the checkpoint was trained with .* --tokenizer OLD_DIR/tokenizer.json"):
        dm.load_state_dict({**dm.state_dict(), "tokenizer_sha256": "0" * 64})


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "meta.json").unlink(), "no meta.json"),
        (lambda d: (d / "train-00001.bin").unlink(), "shard train-00001.bin listed in meta.json is missing"),
        (lambda d: (d / "val-00000.bin").write_bytes(b"\x00\x01"), "val-00000.bin has 2 bytes"),
        (lambda d: (d / "meta.json").write_text("{}"), "not a hydra-kit token-shard description"),
        (lambda d: (d / "meta.json").write_text('{"format": "hydra-kit-token-shards", "dtype": "uint16"}'), r"meta\.json is malformed \(KeyError: 'splits'\)"),
    ],
    ids=["no-meta", "missing-shard", "truncated-shard", "foreign-meta", "malformed-meta"],
)
def test_a_damaged_shard_folder_is_one_line(byte_shards, tmp_path, damage, match):
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in byte_shards.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    damage(folder)
    with pytest.raises(ShardDataError, match=match) as exc:
        ShardDataModule(str(folder)).setup("fit")
    assert "\n" not in str(exc.value) and str(folder) in str(exc.value)
    with pytest.raises(ShardDataError, match="no such folder; make one with hydra-kit prepare"):
        ShardDataModule(str(tmp_path / "nope")).setup("fit")


def test_a_missing_tokenizer_file_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("some text to train a tokenizer on\n" * 30)
    (tmp_path / "b.txt").write_text("other text for the validation split\n" * 30)
    prepare(tmp_path, tmp_path / "out", vocab_size=300, val_fraction=0.5)
    (tmp_path / "out" / "tokenizer.json").unlink()
    with pytest.raises(ShardDataError, match=r"tokenizer\.json listed in meta\.json is missing"):
        ShardDataModule(str(tmp_path / "out"), seq_len=8).setup("fit")


def hydra_kit_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "hydra_kit.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_text_bpe_recipe_trains_from_prepared_shards_and_checkpoints_the_stream(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = SAMPLE.read_text(encoding="utf-8")[:120_000]
    for i, part in enumerate(text.split("\n = ")[:12]):  # a dozen article-sized documents
        (corpus / f"article{i:02d}.txt").write_text(part, encoding="utf-8")
    meta = prepare(corpus, tmp_path / "shards", vocab_size=512, val_fraction=0.25)
    common = [
        "--config", str(REPO / "recipes" / "text-bpe.yaml"), "--data.init_args.path", str(tmp_path / "shards"),
        "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4", "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    result = hydra_kit_cli("fit", *common, "--model.vocab_size", str(meta["vocab_size"]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = " ".join((result.stdout + result.stderr).split())
    values = {k: float(v) for k, v in re.findall(r"val/(\w+) = ([0-9.]+)", out)}
    assert {"bpb", "ppl", "loss"} <= set(values), out[-2000:]
    last = tmp_path / "runs" / "text-bpe" / "version_0" / "checkpoints" / "last.ckpt"
    stream = torch.load(last, weights_only=True)["ShardDataModule"]
    assert stream["batches_done"] == 3 and stream["tokenizer_sha256"] == meta["tokenizer"]["sha256"]
    small = hydra_kit_cli("fit", *common, "--model.vocab_size", "300", cwd=tmp_path)
    assert small.returncode != 0
    err = " ".join(small.stderr.split())
    assert f"the shards use {meta['vocab_size']} token ids" in err and "model.vocab_size is 300" in err and "Traceback" not in err


def test_a_pickled_dataset_maps_the_files_itself(byte_shards):
    import pickle

    windows = ShardDataModule(str(byte_shards), seq_len=16).train_windows(0)
    first = windows[0]
    assert windows._maps  # mapped on first use
    copy = pickle.loads(pickle.dumps(windows))
    assert not copy._maps and torch.equal(copy[0]["input_ids"], first["input_ids"])
