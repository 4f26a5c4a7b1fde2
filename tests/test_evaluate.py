"""Perplexity: token counts of the windows, exact NLL of stub models, agreement with a real model's loss."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prune.evaluate import Perplexity, perplexity, text_perplexity
from prune.one_shot.data import token_stream
from tests.test_oneshot_data import TEXTS, word_tokenizer


class Uniform(nn.Module):
    """Uniform logits over ``vocab`` tokens: perplexity ``vocab`` exactly. Records its inputs' lengths."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.lengths, self.modes = vocab, [], []

    def forward(self, input_ids):
        self.lengths += [input_ids.shape[1]] * input_ids.shape[0]
        self.modes.append(self.training)
        return torch.full((*input_ids.shape, self.vocab), 3.0)


class Oracle(nn.Module):
    """Knows the stream (distinct tokens): puts probability ``p[next]`` on each token's true successor."""

    def __init__(self, stream: torch.Tensor, vocab: int, p: torch.Tensor) -> None:
        super().__init__()
        table = torch.zeros(vocab, vocab, dtype=torch.float64)
        for cur, nxt in zip(stream[:-1].tolist(), stream[1:].tolist()):
            table[cur] = ((1 - p[nxt]) / (vocab - 1)).log()
            table[cur, nxt] = p[nxt].log()
        self.register_buffer("table", table.float())

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])  # as Hugging Face models (Uniform: bare logits)


@pytest.mark.parametrize("n, seq_len, stride, tokens, windows, lengths", [
    (10, 4, None, 7, 3, [4, 4, 2]),  # [0:4] [4:8] [8:10]: 3 + 3 + 1 predicted
    (9, 4, None, 6, 2, [4, 4]),  # [8:9] predicts nothing: dropped
    (8, 4, 4, 6, 2, [4, 4]),  # stride == seq_len: the same as None
    (3, 8, None, 2, 1, [3]),  # shorter than one window
    (10, 4, 2, 9, 4, [4, 4, 4, 4]),  # [0:4] scores 1..3, [2:6] 4..5, [4:8] 6..7, [6:10] 8..9
    (10, 4, 1, 9, 7, [4] * 7),  # [0:4] scores 1..3, then one new token per window
    (11, 4, 3, 10, 4, [4, 4, 4, 2]),  # [0:4] [3:7] [6:10] [9:11]: 3 + 3 + 3 + 1
])
def test_uniform_counts(n, seq_len, stride, tokens, windows, lengths):
    model = Uniform(37)
    result = perplexity(model, torch.arange(n) % 37, seq_len=seq_len, stride=stride, batch_size=3)
    assert (result.tokens, result.windows, result.seq_len) == (tokens, windows, seq_len)
    assert sorted(model.lengths, reverse=True) == lengths
    assert result.perplexity == pytest.approx(37, rel=1e-6)
    assert result.nll == pytest.approx(math.log(37), rel=1e-6)


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_oracle_nll_is_minus_log_p(stride):
    stream = torch.randperm(100)[:61]
    result = perplexity(Oracle(stream, 100, torch.full((100,), 0.3, dtype=torch.float64)), stream, seq_len=8,
                        stride=stride, batch_size=8)
    assert result.nll == pytest.approx(-math.log(0.3), rel=1e-5)
    assert result.perplexity == pytest.approx(1 / 0.3, rel=1e-5)


def test_strided_scores_every_token_once():
    """A different probability for each target token: the mean NLL is over tokens 1..n-1, each once."""
    stream = torch.randperm(100)[:61]
    p = torch.linspace(0.05, 0.95, 100, dtype=torch.float64)[torch.randperm(100)]
    expected = -p[stream[1:]].log().mean().item()
    for stride in (1, 3, 7):
        result = perplexity(Oracle(stream, 100, p), stream, seq_len=8, stride=stride, batch_size=4)
        assert result.tokens == 60 and result.nll == pytest.approx(expected, rel=1e-5)
    plain = perplexity(Oracle(stream, 100, p), stream, seq_len=8)  # non-overlapping: 1, 9, 17, ... not scored
    scored = [t for t in range(1, 61) if t % 8]
    assert plain.tokens == len(scored) == 53
    assert plain.nll == pytest.approx(-p[stream[scored]].log().mean().item(), rel=1e-5)


def test_eval_mode_and_flags_restored():
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.frozen = Uniform(5), nn.Dropout()

        def forward(self, input_ids):
            return self.body(input_ids)

    model = Wrapped().train()
    model.frozen.eval()
    perplexity(model, torch.arange(10) % 5, seq_len=4)
    assert model.body.modes == [False] * 3  # evaluated in eval mode
    assert model.training and model.body.training and not model.frozen.training  # each flag as it was


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_llama_matches_its_own_loss(llama):
    ids = torch.randint(0, 300, (40,))
    with torch.no_grad():
        loss = llama(input_ids=ids[None, :24], labels=ids[None, :24]).loss.item()
        losses = [(llama(input_ids=w[None], labels=w[None]).loss.item(), len(w) - 1) for w in ids.split(16)]
    one = perplexity(llama, ids[:24], seq_len=24)
    assert (one.tokens, one.windows) == (23, 1)
    assert one.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    three = perplexity(llama, ids, seq_len=16)  # [0:16] [16:32] [32:40]: the token-weighted mean loss
    assert three.tokens == 15 + 15 + 7
    assert three.nll == pytest.approx(sum(l * k for l, k in losses) / 37, rel=1e-5)


@pytest.mark.parametrize("stride", [None, 3])
def test_batches_give_the_same_result(llama, stride):
    ids = torch.randint(0, 300, (50,))
    one = perplexity(llama, ids, seq_len=8, stride=stride, batch_size=1)
    many = perplexity(llama, ids, seq_len=8, stride=stride, batch_size=4)
    assert (one.tokens, one.windows) == (many.tokens, many.windows)
    assert many.nll == pytest.approx(one.nll, rel=1e-5)


def test_text_perplexity(tmp_path, capsys):
    tokenizer = word_tokenizer()
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS), encoding="utf-8")
    result = text_perplexity(Uniform(300), tokenizer, path, seq_len=64, stride=16, progress=True)
    assert result.tokens == len(token_stream(TEXTS, tokenizer)) - 1 == 202
    assert result.perplexity == pytest.approx(300, rel=1e-6)
    assert "perplexity" in capsys.readouterr().err  # the progress bar
    assert text_perplexity(Uniform(300), tokenizer, TEXTS, seq_len=64, stride=16) == result
    assert str(result) == "perplexity 300.0000 (nll 5.7038 nats/token over 202 tokens, 10 windows of <= 64)"


def test_bad_arguments():
    model = Uniform(5)
    for ids, what in [(torch.zeros(2, 5, dtype=torch.long), "1-D"), (torch.tensor([1]), "at least 2"),
                      (torch.rand(5), "integer")]:
        with pytest.raises((ValueError, TypeError), match=what):
            perplexity(model, ids)
    for kwargs, what in [({"seq_len": 1}, "seq_len"), ({"seq_len": 4, "stride": 0}, "stride"),
                         ({"seq_len": 4, "stride": 5}, "stride"), ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ValueError, match=what):
            perplexity(model, torch.arange(5), **kwargs)


@pytest.mark.cuda
def test_cuda_matches_cpu(llama):
    ids = torch.randint(0, 300, (50,))
    cpu = perplexity(llama, ids, seq_len=16, stride=4)
    gpu = perplexity(llama.to("cuda"), ids, seq_len=16, stride=4, batch_size=3)
    llama.to("cpu")
    assert gpu.tokens == cpu.tokens == 49 and gpu.nll == pytest.approx(cpu.nll, rel=1e-4)
    assert isinstance(gpu, Perplexity)
