"""Reference one-shot pruning with llm-compressor (SparseGPT / Wanda) on our exact calibration windows.

Runs in its own virtual environment, not in this project's: llm-compressor pins its own transformers and
compressed-tensors. Set up once (CPU torch)::

    python3 -m venv /tmp/lc
    /tmp/lc/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl llmcompressor

(measured with llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu).
Then::

    /tmp/lc/bin/python benchmarks/llmcompressor_reference.py --model DIR --calibration IDS.npy --out OUT_DIR \
        --method sparsegpt|wanda --sparsity 0.5 --pattern unstructured|2:4 [--samples N]

``IDS.npy`` is the int64 (n_windows, seq_len) array of token ids that ``benchmarks/oneshot_quality.py``
writes as ``calibration_ids.npy`` (read without pickle); ``--samples N`` takes its first N rows. Each window
becomes one row of a ``datasets.Dataset`` (``input_ids``, ``attention_mask`` of ones), and
``llmcompressor.oneshot`` prunes the fp32 model on CPU with the sequential pipeline (one decoder layer at a
time, each layer calibrated on the outputs of the already-pruned layers before it). The modifier is
llm-compressor's with its own defaults (SparseGPT: ``block_size=128``, ``dampening_frac=0.01``); only the
targets are set: every ``Linear`` inside ``model.layers.<i>``; ``lm_head`` (tied to the embedding in
SmolLM2) is left dense. SparseGPT's unstructured mask prunes ``score <= sorted(score)[int(numel * s)]``
per 128-column block, so it zeroes one weight more per block than asked (plus ties): its layers read
0.500006-0.500054 on SmolLM2 rather than 0.5. Wanda (per row) and 2:4 are exact. Calibration order is
not shuffled (``shuffle_calibration_samples=False``), so a run is reproducible; the set of windows is the
same either way.

``OUT_DIR`` receives a plain dense Hugging Face folder (``save_compressed=False``: the pruned weights with
exact zeros, no ``quantization_config``, loadable by plain transformers without compressed-tensors), the
tokenizer files when the model folder has them, and ``llmcompressor_run.json``: versions, arguments, the
exact modifier arguments, wall seconds of the ``oneshot`` call, peak RSS (``getrusage``; before and after),
and the fraction of exact zeros of every pruned ``Linear`` plus the overall one. Evaluate the folder on our
side with ``python -m benchmarks.oneshot_quality --eval-folder OUT_DIR --name llmcompressor-...``.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

DECODER_LAYERS = r"re:model\.layers\.\d+$"  # llm-compressor's own examples target decoder layers this way
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")


class _PreTokenized:
    """Stands in for a tokenizer when the model folder has none: the windows are token ids already, and
    llm-compressor only uses its processor to tokenize text datasets (or to pad, which is not used here)."""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def modifier_kwargs(args: argparse.Namespace) -> dict:
    """The modifier's arguments: sparsity, mask structure, targets, ignore; everything else its defaults."""
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    kw = {"sparsity": args.sparsity, "mask_structure": structure, "targets": [args.targets],
          "ignore": ["re:.*lm_head"]}
    if args.method == "sparsegpt":
        kw.update(block_size=args.block_size, dampening_frac=args.dampening_frac)
    return kw


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face model folder (fp32)")
    p.add_argument("--calibration", required=True, help="int64 .npy (n_windows, seq_len) of token ids")
    p.add_argument("--out", required=True, help="output: dense HF folder + llmcompressor_run.json")
    p.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (ignored by N:M masks)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4")
    p.add_argument("--samples", type=int, default=None, help="use the first N windows (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size (default 1)")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT block size (default 128)")
    p.add_argument("--dampening-frac", type=float, default=0.01, help="SparseGPT dampening (default 0.01)")
    p.add_argument("--targets", default=DECODER_LAYERS, help="modules whose Linear layers are pruned")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model, when it has one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.pattern != "unstructured" and args.pattern.count(":") != 1:
        p.error("--pattern must be 'unstructured' or N:M")

    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.utils.pytorch.module import infer_sequential_targets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir, out = Path(args.model), Path(args.out)
    ids = np.load(args.calibration, allow_pickle=False)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"{args.calibration}: expected an integer (n_windows, seq_len) array, got "
                         f"{ids.dtype} {ids.shape}")
    if args.samples is not None:
        if not 0 < args.samples <= len(ids):
            raise SystemExit(f"--samples {args.samples}: the file has {len(ids)} windows")
        ids = ids[: args.samples]
    n, seq_len = ids.shape
    ids = ids.astype(np.int64)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=None).eval()
    if int(ids.max()) >= model.config.vocab_size or int(ids.min()) < 0:
        raise SystemExit(f"token ids outside [0, {model.config.vocab_size})")
    linears_before = {name: m.weight.detach().clone() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)}

    tok_dir = Path(args.tokenizer) if args.tokenizer else model_dir
    has_tokenizer = any((tok_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                         "tokenizer.model"))
    if args.tokenizer and not has_tokenizer:
        raise SystemExit(f"--tokenizer {tok_dir}: no tokenizer files there")
    processor = AutoTokenizer.from_pretrained(tok_dir) if has_tokenizer else _PreTokenized()

    mkw = modifier_kwargs(args)
    modifier = (SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier)(**mkw)
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    okw = {"num_calibration_samples": n, "max_seq_length": seq_len, "batch_size": args.batch_size,
           "shuffle_calibration_samples": False, "pipeline": "sequential"}
    oneshot(model=model, processor=processor, dataset=dataset, recipe=modifier, **okw)
    seconds = time.perf_counter() - t0
    rss_after = _peak_rss_mb()

    # which Linear layers changed, and their exact-zero fractions
    layers, zeros, total = {}, 0, 0
    unchanged = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight.detach()
        if torch.equal(w, linears_before[name]):
            unchanged.append(name)
            continue
        z = int((w == 0).sum())
        layers[name] = {"shape": list(w.shape), "zeros": z, "sparsity": z / w.numel()}
        if args.pattern != "unstructured":
            nk, mk = map(int, args.pattern.split(":"))
            groups = (w.reshape(w.shape[0], -1, mk) == 0).sum(-1)
            layers[name]["groups_ok"] = bool((groups >= nk).all())
        zeros, total = zeros + z, total + w.numel()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=False)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    stripped = cfg.pop("quantization_config", None)
    if stripped is not None:  # dense with zeros needs no compressed-tensors on the loading side
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    copied = [f for f in TOKENIZER_FILES if (tok_dir / f).exists()] if has_tokenizer else []
    for f in copied:
        shutil.copy2(tok_dir / f, out / f)

    run = {
        "tool": "llmcompressor.oneshot",
        "versions": {k: version(k) for k in ("llmcompressor", "compressed-tensors", "transformers", "torch",
                                               "datasets", "numpy")} | {"python": sys.version.split()[0]},
        "args": vars(args),
        "modifier": type(modifier).__name__,
        "modifier_args": mkw,
        "modifier_resolved": modifier.model_dump(include={"sparsity", "mask_structure", "targets", "ignore",
                                                          "block_size", "dampening_frac", "sparsity_profile",
                                                          "preserve_sparsity_mask", "offload_hessians"}),
        "oneshot_args": okw | {"processor": type(processor).__name__,
                               "sequential_targets": sorted(infer_sequential_targets(model, None))},
        "calibration": {"file": str(args.calibration), "windows": n, "seq_len": seq_len,
                        "tokens": n * seq_len},
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 3),
        "seconds_per_calibration_token": seconds / (n * seq_len),
        "peak_rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(rss_after, 1),
        "pruned_layers": len(layers),
        "unchanged_linear": unchanged,
        "overall_sparsity": zeros / total if total else 0.0,
        "layers": layers,
        "saved": {"folder": str(out), "save_compressed": False, "stripped_quantization_config": stripped,
                  "tokenizer_files": copied},
    }
    (out / "llmcompressor_run.json").write_text(json.dumps(run, indent=1, default=str))
    print(f"{run['modifier']} {args.pattern} {args.sparsity}: {n}x{seq_len} tokens, {seconds:.1f} s, "
          f"peak RSS {rss_after:.0f} MB, {len(layers)} layers, overall sparsity "
          f"{run['overall_sparsity']:.4f}")


if __name__ == "__main__":
    main()
