"""Calibration data for one-shot pruning: reading texts, tokenizing them into one stream, drawing windows."""
import json

import pytest
import torch

from prune.one_shot.data import calibration_batches, read_texts, token_stream

VOCAB = 300  # words w0..w297 plus [UNK] and </s>
EOS = 1


def word_tokenizer():
    """A Hugging Face tokenizer built here, nothing downloaded: word ``wK`` is token ``K + 2``, ``</s>`` 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": EOS, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


# four texts of distinct words: the stream is 2..201 with eos (1) between texts, 203 tokens
TEXTS = [words(0, 50), words(50, 100), words(100, 150), words(150, 200)]
STREAM = [*range(2, 52), EOS, *range(52, 102), EOS, *range(102, 152), EOS, *range(152, 202)]


def starts_in(stream: torch.Tensor, windows: torch.Tensor) -> list[int]:
    """Where each window lies in the stream (each must be an exact slice of it, found once)."""
    slices = stream.unfold(0, windows.shape[1], 1)
    found = [(slices == w).all(1).nonzero().flatten().tolist() for w in windows]
    assert all(len(f) == 1 for f in found)
    return [f[0] for f in found]


# read_texts

def test_txt_is_one_stream(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\n\nsecond line é\n", encoding="utf-8")
    assert read_texts(path) == ["first line\n\nsecond line é\n"]
    assert read_texts(str(path)) == ["first line\n\nsecond line é\n"]


def test_jsonl_text_field_bare_strings_and_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 3}) + "\n\n   \n" + json.dumps("two") + "\n"
                    + json.dumps({"text": "thré"}), encoding="utf-8")
    assert read_texts(path) == ["one", "two", "thré"]


@pytest.mark.parametrize("bad, what", [("{not json", "not valid JSON"), ('{"txt": "x"}', '"text"'),
                                       ('{"text": 3}', '"text"'), ("[1, 2]", '"text"')])
def test_jsonl_errors_name_file_and_line(tmp_path, bad, what):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=what) as e:
        read_texts(path)
    assert "bad.jsonl:3:" in str(e.value)


def test_unknown_suffix_and_empty(tmp_path):
    (tmp_path / "a.csv").write_text("text\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*\.txt.*\.jsonl"):
        read_texts(tmp_path / "a.csv")
    for name, content in [("e.txt", " \n "), ("e.jsonl", "\n\n")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match="no text"):
            read_texts(tmp_path / name)


# calibration_batches

def test_stream_has_eos_between_texts(tokenizer):
    assert token_stream(TEXTS, tokenizer).tolist() == STREAM
    assert token_stream(["w0 w1"], tokenizer).tolist() == [2, 3]  # no special tokens added to a text


def test_shapes_and_determinism(tokenizer):
    batches = calibration_batches(TEXTS, tokenizer, samples=7, seq_len=16, seed=3, batch_size=3)
    assert [tuple(b.shape) for b in batches] == [(3, 16), (3, 16), (1, 16)]
    assert all(b.dtype == torch.int64 for b in batches)
    again = calibration_batches(TEXTS, tokenizer, samples=7, seq_len=16, seed=3, batch_size=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = calibration_batches(TEXTS, tokenizer, samples=7, seq_len=16, seed=4, batch_size=3)
    assert not torch.equal(torch.cat(batches), torch.cat(other))


def test_disjoint_windows_when_the_stream_is_long_enough(tokenizer):
    stream = torch.tensor(STREAM)
    for seed in range(5):  # 203 tokens >= 12 * 16: 12 of the 12 consecutive windows, in a random order
        windows = torch.cat(calibration_batches(TEXTS, tokenizer, samples=12, seq_len=16, seed=seed))
        starts = starts_in(stream, windows)
        assert sorted(starts) == list(range(0, 12 * 16, 16))
    windows = torch.cat(calibration_batches(TEXTS, tokenizer, samples=5, seq_len=16, seed=0))
    starts = sorted(starts_in(stream, windows))  # 5 of the 12
    assert len(starts) == 5 and all(s % 16 == 0 for s in starts) and len(set(starts)) == 5


def test_overlapping_windows_when_the_stream_is_short(tokenizer):
    stream = torch.tensor(STREAM)
    windows = torch.cat(calibration_batches(TEXTS, tokenizer, samples=20, seq_len=50, seed=0))
    assert windows.shape == (20, 50)
    starts = starts_in(stream, windows)  # every window an exact slice of the stream, starting anywhere
    assert all(0 <= s <= len(STREAM) - 50 for s in starts) and any(s % 50 for s in starts)
    assert (windows == EOS).any()  # windows cross the texts' boundaries


def test_path_input(tmp_path, tokenizer):
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS), encoding="utf-8")
    from_file = calibration_batches(path, tokenizer, samples=6, seq_len=20, seed=1)
    assert all(torch.equal(a, b) for a, b in
               zip(from_file, calibration_batches(TEXTS, tokenizer, samples=6, seq_len=20, seed=1)))
    with pytest.raises(FileNotFoundError, match="list of strings"):
        calibration_batches(str(tmp_path / "missing.txt"), tokenizer)


def test_too_short_and_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match=r"203 tokens.*seq_len=256.*--seq-len"):
        calibration_batches(TEXTS, tokenizer, samples=1, seq_len=256)
    with pytest.raises(TypeError, match="tokenizer"):
        calibration_batches(TEXTS)
    with pytest.raises(ValueError, match="samples"):
        calibration_batches(TEXTS, tokenizer, samples=0)
    with pytest.raises(ValueError, match="seq_len"):
        calibration_batches(TEXTS, tokenizer, seq_len=1)
    with pytest.raises(TypeError, match="integer"):
        calibration_batches(torch.rand(100))


def test_tensor_inputs():
    stream = torch.arange(1000, dtype=torch.int32)
    windows = torch.cat(calibration_batches(stream, samples=10, seq_len=50, seed=0, batch_size=4))
    assert windows.dtype == torch.int64 and windows.shape == (10, 50)
    assert sorted(starts_in(stream.long(), windows)) == sorted(int(w[0]) for w in windows)
    assert all(int(w[0]) % 50 == 0 for w in windows) and len({int(w[0]) for w in windows}) == 10
    rows = torch.arange(60).view(6, 10)  # 2-D: windows already, the first `samples` rows as they are
    batches = calibration_batches(rows, samples=5, seq_len=512, batch_size=2)
    assert [b.tolist() for b in batches] == [rows[0:2].tolist(), rows[2:4].tolist(), rows[4:5].tolist()]
    assert torch.equal(torch.cat(calibration_batches(rows, samples=100)), rows)
    with pytest.raises(ValueError, match="1-D stream or 2-D"):
        calibration_batches(torch.zeros(2, 2, 2, dtype=torch.long))
