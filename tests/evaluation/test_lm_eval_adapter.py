"""The lm-evaluation-harness adapter against direct computations with the model, and its tokenizers."""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch

from hydra_kit.errors import RecipeError
from hydra_kit.evaluation.tokenizer import ByteTokenizer, TextTokenizer, load_tokenizer
from hydra_kit.network import HydraNetwork

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'hydra-kit[eval]' (make setup installs it)")

from lm_eval.api.instance import Instance

from hydra_kit.evaluation.lm_eval_adapter import HydraEvalLM

COMPONENTS = {
    "ssm": {"component": "ssm", "blocks": "all", "args": {"d_state": 8, "headdim": 8, "chunk_size": 8}},
    "sga": {"component": "sga", "blocks": [1], "args": {"n_heads": 2, "window": 8, "max_global": 6}},
    "mlp": {"component": "mlp", "blocks": "all"},
}


def byte_network(vocab: int) -> HydraNetwork:
    torch.manual_seed(0)
    return HydraNetwork(vocab_size=vocab, d_model=32, n_blocks=2, components=COMPONENTS).eval()


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logprobs(network: HydraNetwork, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (n - 1,) of tokens[1:] and whether each is the argmax, from one forward of all tokens."""
    with torch.no_grad():
        logits = network(torch.tensor([tokens])).logits[0, :-1].float()
    target = torch.tensor(tokens[1:])
    return logits.log_softmax(-1).gather(-1, target[:, None])[:, 0].double(), logits.argmax(-1) == target


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_loglikelihood_is_the_sum_of_the_continuations_log_softmax(chunk_size):
    network = byte_network(257)  # id 256 ends a document: every request starts after it
    lm = HydraEvalLM(network, ByteTokenizer(257), chunk_size=chunk_size)
    pairs = [("The sky is ", "blue"), ("The sky is", " green"), ("", "x"), ("abc", "")]
    results = lm.loglikelihood([request("loglikelihood", c, k) for c, k in pairs])
    for (context, continuation), (logprob, is_greedy) in zip(pairs, results, strict=True):
        tokens = [256, *(context + continuation).encode()]
        # As lm-eval's own models do, spaces ending the context are scored with the continuation.
        n = len(continuation.encode()) + len(context) - len(context.rstrip())
        expected, greedy = direct_logprobs(network, tokens)
        assert logprob == pytest.approx(float(expected[len(expected) - n :].sum()) if n else 0.0, abs=1e-4)
        assert is_greedy == (bool(greedy[len(greedy) - n :].all()) if n else True)


@pytest.mark.parametrize("vocab", [256, 257])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_rolling_loglikelihood_is_the_whole_text_sum(vocab, chunk_size):
    network = byte_network(vocab)
    lm = HydraEvalLM(network, ByteTokenizer(vocab), chunk_size=chunk_size)
    texts = ["Recurrent models carry their state across windows.", "é€ and more", ""]
    results = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts])
    for text, total in zip(texts, results, strict=True):
        data = list(text.encode())
        if not data:
            assert total == 0.0
        elif vocab == 257:  # after the end-of-document token: every byte is predicted
            assert total == pytest.approx(float(direct_logprobs(network, [256, *data])[0].sum()), abs=1e-4)
        else:  # no start token: the first byte is uniform, the rest predicted
            expected = -math.log(256) + float(direct_logprobs(network, data)[0].sum())
            assert total == pytest.approx(expected, abs=1e-4)


class Letters(TextTokenizer):
    """One letter per id, so that greedy output and stop strings line up exactly."""

    name, vocab_size, eos_id = "letters", 40, None
    alphabet = "abcdefghijklmnopqrstuvwxyz .,:;!?0123456"

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


def test_generate_until_stops_at_the_until_string_and_max_gen_toks():
    torch.manual_seed(1)
    network = HydraNetwork(vocab_size=40, d_model=32, n_blocks=2, components=COMPONENTS).eval()
    tokenizer = Letters()
    context = "the cat sat on"
    tokens = network.generate(torch.tensor([tokenizer.encode(context)]), 16, temperature=0)
    full = tokenizer.decode([int(t[0]) for t in tokens])
    stop = full[6:8]
    lm = HydraEvalLM(network, tokenizer)
    out = lm.generate_until(
        [
            request("generate_until", context, {"until": [stop], "max_gen_toks": 16}),
            request("generate_until", context, {"until": stop, "max_gen_toks": 16}),
            request("generate_until", context, {"until": [], "max_gen_toks": 5}),
        ]
    )
    assert out == [full[: full.find(stop)], full[: full.find(stop)], full[:5]]


def test_loglikelihood_says_whether_the_continuation_is_the_greedy_one():
    torch.manual_seed(2)
    network = HydraNetwork(vocab_size=40, d_model=32, n_blocks=2, components=COMPONENTS).eval()
    tokenizer = Letters()
    context = "on the mat"
    tokens = network.generate(torch.tensor([tokenizer.encode(context)]), 4, temperature=0)
    greedy = tokenizer.decode([int(t[0]) for t in tokens])
    other = greedy[:3] + tokenizer.alphabet[(tokenizer.alphabet.index(greedy[3]) + 1) % 40]
    results = HydraEvalLM(network, tokenizer).loglikelihood([request("loglikelihood", context, c) for c in (greedy, other)])
    assert [is_greedy for _, is_greedy in results] == [True, False]
    assert results[0][0] > results[1][0]  # the last token differs, and the greedy one is the most likely there


def test_model_info_names_the_model_and_tokenizer():
    lm = HydraEvalLM(byte_network(256), ByteTokenizer(256), name="runs/x.ckpt")
    info = lm.get_model_info()
    assert info["model"] == "runs/x.ckpt" and info["tokenizer"] == "bytes" and info["model_num_parameters"] > 0
    assert lm.tokenizer_name == "bytes"


def test_tokenizer_json_is_read_with_its_end_of_document_token(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers is not installed: pip install 'hydra-kit[eval]'")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["the cat sat on the mat", "the dog sat on the log"] * 20, trainer=trainer)
    tk.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path, model_vocab=512)  # a folder holding tokenizer.json
    assert tokenizer.eos_id == 0
    text = "the cat sat <|endoftext|> on a mat"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_id not in ids  # the literal string is text, not a document boundary
    with pytest.raises(RecipeError, match="ids but the model's vocabulary is 100"):
        load_tokenizer(tmp_path / "tokenizer.json", model_vocab=100)


def test_bad_tokenizer_specs_are_one_line_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json", model_vocab=256)
    with pytest.raises(RecipeError, match="at least 256"):
        load_tokenizer(None, model_vocab=64)
    (tmp_path / "tokenizer.json").write_text("not json")
    pytest.importorskip("tokenizers")
    with pytest.raises(RecipeError, match="not a tokenizers JSON file"):
        load_tokenizer(tmp_path, model_vocab=256)


def test_missing_lm_eval_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # makes `import lm_eval.api.model` fail
    monkeypatch.delitem(sys.modules, "hydra_kit.evaluation.lm_eval_adapter")
    with pytest.raises(RecipeError, match=r"pip install 'hydra-kit\[eval\]'"):
        importlib.import_module("hydra_kit.evaluation.lm_eval_adapter")
