"""from_pretrained: a converted Hugging Face folder loads as its own architecture, sparse, equal to the dense model;
clear errors for a path that is not such a folder."""
import json
import sys

import pytest
import torch
from torch import nn

from sparse_ops.checkpoint.convert import convert_checkpoint
from sparse_ops.linear import SparseLinear
from sparse_ops.plan import plan_rows
from sparse_ops.pretrained import from_pretrained


def bert_for_masked_lm():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=32))


def gpt2_lm_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def pruned_layers(model):
    """Names of the linear layers (nn.Linear and GPT-2's Conv1D) but the LM head, tied to the embedding."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and 100 not in m.weight.shape]


def pruned(model):
    """90% of each weight of ``pruned_layers`` zero; embeddings (and the tied heads) dense."""
    with torch.no_grad():
        for name in pruned_layers(model):
            w = model.get_submodule(name).weight
            w.masked_fill_(torch.rand(w.shape) < 0.9, 0.0)
    return model.eval()


def converted(tmp_path, model):
    """``model`` saved as an HF folder (with a tokenizer file) and converted to a sparse folder."""
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer.json").write_text('{"version": "1.0"}')
    convert_checkpoint(tmp_path / "dense", tmp_path / "sparse")
    return tmp_path / "sparse"


@pytest.mark.parametrize("make", [bert_for_masked_lm, gpt2_lm_head])
def test_a_converted_folder_loads_as_its_architecture_and_matches_the_dense_model(tmp_path, make):
    dense = pruned(make())
    folder = converted(tmp_path, dense)
    model = from_pretrained(folder, fuse=False)  # the module tree as stored
    assert type(model) is type(dense) and not model.training
    sparse = {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert sparse == set(pruned_layers(dense)) and len(sparse) >= 8  # every pruned linear (and Conv1D)
    fused = from_pretrained(folder)  # the default: every proven fusion
    assert {r["name"] for r in plan_rows(fused)} == sparse  # the plan names layers as stored, fused or not
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        for m in (model, fused):
            torch.testing.assert_close(m(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_sparsify_options_pass_through(tmp_path):
    dense = pruned(gpt2_lm_head())
    model = from_pretrained(converted(tmp_path, dense), kernel="ours", fuse=True, verbose=False)
    assert plan_rows(model) == []  # pinned to our kernels: nothing planned
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_the_model_is_built_without_random_initialisation(tmp_path, monkeypatch):
    from transformers.models.bert.modeling_bert import BertPreTrainedModel

    folder = converted(tmp_path, pruned(bert_for_masked_lm()))

    def no_init(self, module):
        raise AssertionError("from_pretrained ran the random initialisation")
    monkeypatch.setattr(BertPreTrainedModel, "_init_weights", no_init)
    assert type(from_pretrained(folder)).__name__ == "BertForMaskedLM"


def test_a_config_naming_no_architecture_builds_the_auto_model(tmp_path):
    from transformers import BertConfig, BertModel

    dense = pruned(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=100)))
    folder = converted(tmp_path, dense)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    model = from_pretrained(folder)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        assert type(model) is BertModel
        torch.testing.assert_close(model(ids).last_hidden_state, dense(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def _unknown_architecture(tmp_path):
    folder = converted(tmp_path, pruned(gpt2_lm_head()))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForLM"]}))
    return folder


def _no_config(tmp_path):
    folder = converted(tmp_path, pruned(gpt2_lm_head()))
    (folder / "config.json").unlink()
    return folder


def _unreadable_config(tmp_path):
    folder = converted(tmp_path, pruned(gpt2_lm_head()))
    (folder / "config.json").write_text('{"model_type": "no-such-type"}')
    return folder


def _file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path / "model.safetensors"


def _without_transformers(tmp_path, monkeypatch):
    folder = converted(tmp_path, pruned(gpt2_lm_head()))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    return folder


BAD_FOLDERS = {  # case -> (make the path, error type, message)
    "missing": (lambda tmp, mp: tmp / "nope", FileNotFoundError, "no such model folder: .*nope"),
    "a file": (lambda tmp, mp: _file(tmp), NotADirectoryError,
               r"needs a model folder .*got the file .*model.safetensors; .*sparsify\(model, "),
    "no config.json": (lambda tmp, mp: _no_config(tmp), FileNotFoundError,
                       r"sparse has no config.json: .*prune convert HF_DIR -o OUT_DIR"),
    "unknown architecture": (lambda tmp, mp: _unknown_architecture(tmp), ValueError,
                             r"unknown architecture 'NoSuchModelForLM' \(architectures\[0\] of .*config.json\): "
                             + r"not a model class of transformers .*allowed: a transformers model class"),
    "unreadable config": (lambda tmp, mp: _unreadable_config(tmp), ValueError,
                          r"cannot read .*config.json with transformers .*no-such-type"),
    "transformers missing": (_without_transformers, ImportError, r"needs the transformers package"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_path_that_is_not_a_usable_folder_is_a_clear_error(tmp_path, monkeypatch, case):
    make, error, message = BAD_FOLDERS[case]
    path = make(tmp_path, monkeypatch)
    with pytest.raises(error, match=message):
        from_pretrained(path)
