"""A bytes model of the GPU kernels at decode: predicted, not measured.

At 1-16 tokens a linear layer is memory-bound: its time is at least the bytes it moves over HBM divided by the
bandwidth. For each kernel (dense fp16 cuBLAS GEMV as the reference, the Triton tiled bitmap at 50 / 70 / 90%
unstructured sparsity, the Triton 2:4 kernel) on Llama-7B's linear shapes at 1 and 16 tokens in fp16, the
model counts the bytes of the weight as the formats actually store it (real ``TiledBitmap`` / ``TwoFour``
tensors built from random weights at that sparsity: values + bitmaps / metadata + offsets), plus the
activations read (tokens x in) and outputs written (tokens x out) once, and predicts

- the speedup over dense if both were bandwidth-bound: dense bytes / sparse bytes;
- the time at the H100's and the H200's HBM bandwidth: bytes / bandwidth (a lower bound).

Not modelled: re-reads of x from L2 (one per tile row), split-K's fp32 partials (splits x tokens x out x 4
bytes written and read again through L2, small next to the weight at <= 16 tokens), launch latency (one launch
per product, split-K included: a few microseconds, the same order as these times; the model is an upper bound
on the speedup).
It also records the registers per thread of the compiled kernels (``sparse_ops.kernels.triton_compiled``, sm_90,
the config that runs at 1-16 tokens) and the blocks of 128 threads per SM they allow.

Run: ``python -m benchmarks.gpu_model [--out benchmarks/results/gpu] [--tiny]``; writes model.json and model.md.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from sparse_ops.bitmap import DEFAULT_TILE, TiledBitmap
from sparse_ops.formats import TwoFour
from sparse_ops.kernels.triton_sparse import AlignedTiles

# HBM bandwidth, from the vendors' spec sheets: NVIDIA H100 SXM5 datasheet ("GPU memory bandwidth 3.35TB/s")
# and NVIDIA H200 datasheet ("GPU memory bandwidth 4.8TB/s")
H100_BANDWIDTH = 3.35e12  # bytes / s
H200_BANDWIDTH = 4.8e12
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # Llama-7B: attention projections, up / gate, down
TINY_SHAPES = ((64, 128),)
TOKENS = (1, 16)
SPARSITIES = (0.5, 0.7, 0.9)
DTYPE = torch.float16
ELEMENT = 2  # bytes of an fp16 value
# the compiled configs the model quotes registers for (sparse_ops.kernels.triton_compiled.CASES), on sm_90
REGISTER_CASES = {"tiled bitmap": "tiled-fp16-n16-plain", "tiled bitmap, split-K": "tiled-fp16-n16-splitk",
                  "tiled bitmap, gemv": "tiled-gemv-fp16", "2:4": "two_four-fp16-n16", "MoE": "moe-fp16"}
REGISTER_ARCH = 90
NOTE = "predicted, not measured: a bytes model (benchmarks/gpu_model.py), no GPU was used"
# Loads in flight (Little's law): streaming at bandwidth B with a memory latency L needs B x L bytes in flight
# across the GPU. L is an assumption, not a measurement: loaded HBM latency on Hopper is several hundred ns
# (published microbenchmarks); the model states the need at this L and what a lower one would change.
H100_SMS = 132
DRAM_LATENCY_S = 700e-9
PIPELINE_DEPTH = 2  # iterations whose loads a program has in flight: the current one and the one prefetched
# (Triton's software pipeline at num_stages >= 2 issues iteration i + 1's loads while i computes)
IN_FLIGHT_SHAPE = (4096, 4096)
TILED_REGISTERS = "tiled by value block / tiles per iteration"  # registers()'s key for TILED_CASES
# the compiled split-K decode config of the tiled kernel per (value block, tiles per iteration)
TILED_CASES = {(2048, 1): "tiled-fp16-n16-splitk", (1024, 2): "tiled-fp16-n16-splitk-v1024-s2",
               (512, 4): "tiled-fp16-n16-splitk-v512-s4", (256, 4): "tiled-fp16-n16-splitk-v256-s4"}


def _random_sparse(shape: tuple[int, int], sparsity: float, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(shape, generator=gen) >= sparsity
    return (torch.randn(shape, generator=gen) * keep).to(DTYPE)


def _random_two_four(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen)
    groups = w.reshape(-1, 4)
    drop = groups.abs().argsort(dim=1)[:, :2]  # the two smallest of each group of four
    return groups.scatter(1, drop, 0.0).reshape(shape).to(DTYPE)


def weight_bytes(shape: tuple[int, int], kernel: str, sparsity: float | None, gen: torch.Generator) -> dict:
    """Bytes of the weight as the kernel reads it, per stored part, from a real tensor of random weights."""
    if kernel == "dense":
        return {"values": shape[0] * shape[1] * ELEMENT}
    if kernel == "2:4":
        parts = TwoFour.from_dense(_random_two_four(shape, gen)).parts()
    else:  # as the GPU state holds it: each tile's values aligned to 16 bytes (triton_sparse.AlignedTiles)
        tiles = AlignedTiles.from_tiled(TiledBitmap.from_dense(_random_sparse(shape, sparsity, gen), DEFAULT_TILE))
        parts = {name: getattr(tiles, name) for name in ("tile_ptr", "tile_cols", "starts", "bitmaps", "values")}
    return {name: t.numel() * t.element_size() for name, t in parts.items()}


def rows(shapes, tokens=TOKENS, sparsities=SPARSITIES, seed: int = 0) -> list[dict]:
    """One row per (shape, kernel, tokens): bytes moved, predicted speedup over dense and predicted times."""
    gen = torch.Generator().manual_seed(seed)
    kernels = [("dense", None)] + [("tiled bitmap", s) for s in sparsities] + [("2:4", 0.5)]
    out = []
    for shape in shapes:
        weights = {(k, s): weight_bytes(shape, k, s, gen) for k, s in kernels}
        for n in tokens:
            io = n * shape[1] * ELEMENT + n * shape[0] * ELEMENT  # x read, y written, once
            dense = sum(weights["dense", None].values()) + io
            for k, s in kernels:
                w = sum(weights[k, s].values())
                total = w + io
                out.append({"shape": list(shape), "tokens": n, "kernel": k, "sparsity": s,
                            "weight_parts_bytes": weights[k, s], "weight_bytes": w, "io_bytes": io,
                            "total_bytes": total, "bytes_per_weight": w / (shape[0] * shape[1]),
                            "predicted_speedup_vs_dense": dense / total,
                            "predicted_us_h100": total / H100_BANDWIDTH * 1e6,
                            "predicted_us_h200": total / H200_BANDWIDTH * 1e6})
    return out


def registers() -> dict:
    """Registers per thread of the compiled decode configs on sm_90 and the blocks per SM they allow; a
    ``reason`` instead where they cannot be compiled here."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"reason": "TRITON_INTERPRET=1: compiling needs it unset"}
    try:
        from sparse_ops.kernels import triton_compiled as tc

        found = {}
        for kernel, name in REGISTER_CASES.items():
            f = tc.facts(tc.case(name), REGISTER_ARCH)
            found[kernel] = {"case": name, "arch": f"sm_{REGISTER_ARCH}", "regs": f["regs"],
                             "threads": f["threads"], "n_spills": f["n_spills"],
                             "blocks_per_sm": tc.blocks_per_sm(f["regs"], f["threads"])}
        found[TILED_REGISTERS] = {
            f"{block}/{step}": tc.facts(tc.case(name), REGISTER_ARCH)["regs"] for (block, step), name in TILED_CASES.items()}
        return found
    except Exception as e:  # noqa: BLE001 (no triton / no NVIDIA backend: the model stands without them)
        return {"reason": f"not compiled: {type(e).__name__}: {e}"}


def _programs(tiles: AlignedTiles, sms: int = H100_SMS) -> int:
    """Programs the tiled kernel launches at one token on ``sms`` SMs (``triton_sparse.choose_splits`` for
    "splitk", with its target of 4 programs per SM)."""
    from sparse_ops.kernels import triton_sparse as ts

    want = -(-4 * sms // tiles.tile_rows)
    splits = max(min(want, -(-tiles.max_row_tiles // ts.MIN_TILES_PER_SPLIT), ts.MAX_SPLITS), 2)
    return tiles.tile_rows * splits


def in_flight(registers_: dict, sparsities=SPARSITIES, shape=IN_FLIGHT_SHAPE, seed: int = 0) -> list[dict]:
    """Per sparsity, the tiled kernel's bytes in flight per SM at one token (its layer's value block and tiles
    per iteration, from real ``AlignedTiles``; its registers, from the compiled config), against the
    ``B x L / SMs`` an SM needs to stream at full bandwidth; and the same with one tile per iteration."""
    from sparse_ops.kernels import triton_compiled as tc

    gen = torch.Generator().manual_seed(seed)
    need = H100_BANDWIDTH * DRAM_LATENCY_S / H100_SMS
    out = []
    for sparsity in sparsities:
        tiles = AlignedTiles.from_tiled(TiledBitmap.from_dense(_random_sparse(shape, sparsity, gen), DEFAULT_TILE))
        count = tiles.starts.numel() - 1
        per_tile = (tiles.values.numel() * tiles.values.element_size() + tiles.bitmaps.numel() * 4) / count + 8
        known = registers_.get(TILED_REGISTERS, {})
        launched = -(-_programs(tiles) // H100_SMS)
        row = {"sparsity": sparsity, "shape": list(shape), "block": tiles.block, "step": tiles.step,
               "bytes_per_tile": round(per_tile), "need_per_sm_bytes": round(need)}
        # one tile per iteration: the registers of the one-tile config (a dense tile's block)
        for name, step, regs in (("", tiles.step, known.get(f"{tiles.block}/{tiles.step}")),
                                 ("_step1", 1, known.get(f"{tiles.tile_out * tiles.tile_k}/1"))):
            resident = min(tc.blocks_per_sm(regs) if regs else 4, launched)
            row[f"registers{name}"], row[f"programs_per_sm{name}"] = regs, resident
            flight = resident * PIPELINE_DEPTH * step * per_tile
            row[f"in_flight_per_sm_bytes{name}"] = round(flight)
            row[f"fraction_of_bandwidth{name}"] = round(min(1.0, flight / need), 2)
        out.append(row)
    return out


def falsifiers(rows_: list[dict]) -> list[str]:
    """What a measurement would falsify, with the model's predictions (first shape, 1 token) quoted."""
    first = [r for r in rows_ if r["shape"] == rows_[0]["shape"] and r["tokens"] == 1]
    pred = {(r["kernel"], r["sparsity"]): r["predicted_speedup_vs_dense"] for r in first}
    at = f"{first[0]['shape'][0]}x{first[0]['shape'][1]}, 1 token"
    return [
        "If dense cuBLAS at 1-16 tokens reaches well under its predicted bandwidth (kernel-only, cold L2), the "
        "reference is not bandwidth-bound on that GPU: compare the sparse kernels to the measured dense time.",
        f"If the tiled kernel at 90% runs under 2x cuBLAS kernel-only with a cold L2 (predicted "
        f"{pred['tiled bitmap', 0.9]:.1f}x at {at}), it is latency- or instruction-bound, not bandwidth-bound: "
        "its per-tile bitmap decode and the gather of values by rank, not its bytes, set its time.",
        f"If the tiled kernel at 50% is not faster than cuBLAS (predicted {pred['tiled bitmap', 0.5]:.2f}x), the "
        "decode costs more than the bytes it saves.",
        f"If the 2:4 kernel is under 1.5x cuBLAS (predicted {pred['2:4', 0.5]:.2f}x), its expansion in registers, "
        "not its bytes, bounds it.",
        "If a kernel at 16 tokens is much slower than at 1 token (nearly the same bytes), it is compute- or "
        "occupancy-bound there: check its registers and blocks per SM below.",
        "If the tiled kernel at 70-90% is no faster with several tiles per iteration than with one (gpu_decision's "
        "`step1` variant), the loads in flight below are not what bounds it (or the latency is lower than "
        "assumed): ncu's memory throughput and long-scoreboard stalls say which.",
    ]


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def markdown(data: dict) -> str:
    """model.md: the table, the registers and what a measurement would falsify."""
    lines = ["# GPU kernels: a bytes model at decode", "", f"**{NOTE}.** "
             f"Bandwidths: H100 SXM5 {H100_BANDWIDTH / 1e12:.2f} TB/s, H200 {H200_BANDWIDTH / 1e12:.1f} TB/s "
             "(NVIDIA's spec sheets). fp16; weight bytes from real `AlignedTiles` (the GPU state of a `TiledBitmap`, tile "
             f"{DEFAULT_TILE[0]}x{DEFAULT_TILE[1]}) / `TwoFour` tensors of random weights; x read and y "
             "written once. Times are lower bounds (bytes / bandwidth); speedups are upper bounds.", "",
             "| shape (out x in) | tokens | kernel | bytes / weight | total bytes | predicted speedup vs dense "
             "| H100 us | H200 us |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        kernel = r["kernel"] + (f" {r['sparsity']:.0%}" if r["kernel"] == "tiled bitmap" else "")
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {kernel} | {r['bytes_per_weight']:.3f} "
                     f"| {_fmt_bytes(r['total_bytes'])} | {r['predicted_speedup_vs_dense']:.2f}x "
                     f"| {r['predicted_us_h100']:.2f} | {r['predicted_us_h200']:.2f} |")
    lines += ["", "## Registers (compiled for sm_90 without a GPU, the 1-16 token config)", ""]
    regs = data["registers"]
    if "reason" in regs:
        lines.append(f"Not available: {regs['reason']}")
    else:
        lines += ["| kernel | config | registers / thread | threads / block | spills | blocks / SM "
                  "(65536 / (regs x threads)) |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['case']} | {v['regs']} | {v['threads']} | {v['n_spills']} | {v['blocks_per_sm']} |"
                  for k, v in regs.items() if k != TILED_REGISTERS]
    lines += ["", "## Loads in flight (tiled bitmap, split-K, 1 token)", "",
              f"Little's law: to stream {H100_BANDWIDTH / 1e12:.2f} TB/s with a latency of "
              f"{DRAM_LATENCY_S * 1e9:.0f} ns (an assumption, not a measurement), each of the H100's {H100_SMS} "
              f"SMs needs B x L / SMs bytes in flight. A program keeps {PIPELINE_DEPTH} iterations of loads in "
              "flight; the resident programs per SM are the fewer of those that fit its registers and those the "
              "launch gives it. `step`: tiles per iteration (this version); `step 1`: one tile per iteration "
              "(the kernel before it).", "",
              "| sparsity | value block | step | bytes / tile | registers | programs / SM | in flight / SM "
              "| fraction of bandwidth | step 1: programs / SM | step 1: in flight / SM | step 1: fraction |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.0%} | {r['block']} | {r['step']} | {r['bytes_per_tile']} | {r['registers']} "
              f"| {r['programs_per_sm']} | {_fmt_bytes(r['in_flight_per_sm_bytes'])} | {r['fraction_of_bandwidth']} "
              f"| {r['programs_per_sm_step1']} | {_fmt_bytes(r['in_flight_per_sm_bytes_step1'])} "
              f"| {r['fraction_of_bandwidth_step1']} |" for r in data["in_flight"]]
    if data["in_flight"]:
        lines += ["", f"Needed per SM: {_fmt_bytes(data['in_flight'][0]['need_per_sm_bytes'])}."]
    lines += ["", "## What a measurement would falsify", ""] + [f"- {f}" for f in data["falsifiers"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Compute the model and write model.json and model.md under ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu")
    p.add_argument("--tiny", action="store_true", help="one small shape (for the tests)")
    a = p.parse_args(argv)
    data = {"note": NOTE, "bandwidth_bytes_per_s": {"H100 SXM5": H100_BANDWIDTH, "H200": H200_BANDWIDTH},
            "bandwidth_source": "NVIDIA H100 and H200 datasheets", "dtype": "fp16", "tile": list(DEFAULT_TILE),
            "rows": rows(TINY_SHAPES if a.tiny else SHAPES), "registers": registers()}
    data["in_flight"] = in_flight(data["registers"], shape=TINY_SHAPES[0] if a.tiny else IN_FLIGHT_SHAPE)
    data["falsifiers"] = falsifiers(data["rows"])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "model.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / "model.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
