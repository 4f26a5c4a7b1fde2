"""The kernels' parallel loops (``csrc/work_pool.h``): every backend at 1-4 threads gives the sums of one thread
bit for bit (every item writes its own outputs, so the split never changes a reduction), one thread matches the
fp32 reference, and the rule that moves jobs a level up (OpenMP -> pool -> solo) when the caller waits for a
descheduled thread."""
import os
import threading

import pytest
import torch

from sparse_ops.formats import CSR, TwoFour
from sparse_ops.kernels import cpp, ours_cpu, reference
from sparse_ops.quantized import BitmapInt8, CSRInt8, DenseInt8
from tests.test_formats import two_four, unstructured

pytestmark = pytest.mark.skipif(not cpp.available(), reason="native CPU kernels unavailable (no compiler)")

gen = torch.Generator().manual_seed(0)


def _x(n, d):
    return torch.randn(n, d, generator=gen)


def _linear(fmt, prepare, matmul, n, **kw):
    w, x, b = prepare(fmt), _x(n, fmt.shape[1]), torch.randn(fmt.shape[0], generator=gen)
    return (lambda: matmul(w, x, b, **kw)), (lambda: reference.REFERENCE[fmt.format](fmt, x) + b)


def _ffn(gated, n):
    up, down = (ours_cpu.prepare_csr(CSR.from_dense(unstructured(s, 0.8))) for s in ((96, 40), (40, 96)))
    gate = ours_cpu.prepare_csr(CSR.from_dense(unstructured((96, 40), 0.8))) if gated else None
    x = _x(n, 40)

    def ref():
        h = torch.nn.functional.silu(x @ gate.source.to_dense().t()) * (x @ up.source.to_dense().t()) if gated \
            else torch.nn.functional.gelu(x @ up.source.to_dense().t())
        return h @ down.source.to_dense().t()
    return (lambda: ours_cpu.ffn_matmul(up, down, x, None, None, "silu" if gated else "gelu", gate=gate)), ref


def _attention(S, L, causal):
    q, k, v = torch.randn(2, 6, S, 32, generator=gen), torch.randn(2, 3, L, 32, generator=gen), \
        torch.randn(2, 3, L, 32, generator=gen)

    def ref():
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        mask = torch.ones(S, L, dtype=torch.bool).tril(L - S) if causal else None
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(1, 2)
    return (lambda: ours_cpu.attention(q, k, v, causal=causal)), ref


def _moe(tokens):
    E, D, H = 4, 40, 64
    w_in, w_out = torch.randn(E, H, D, generator=gen) / 8, torch.randn(E, D, H, generator=gen) / 8
    logits, x = torch.randn(tokens, E, generator=gen), _x(tokens, D)

    def ref():
        p = logits.softmax(-1)
        top, idx = p.topk(2, -1)
        top = top / top.sum(-1, keepdim=True)
        y = torch.zeros(tokens, D)
        for t in range(tokens):
            for j in range(2):
                e = int(idx[t, j])
                y[t] += top[t, j] * (torch.nn.functional.gelu(x[t] @ w_in[e].t()) @ w_out[e].t())
        return y
    return (lambda: ours_cpu.moe_forward(logits, x, 2, None, w_in, None, w_out, None, "gelu")[0]), ref


def _csr(n, variant, shape=(300, 500), sparsity=0.5):
    return _linear(CSR.from_dense(unstructured(shape, sparsity)), ours_cpu.prepare_csr, ours_cpu.csr_matmul, n,
                   variant=variant)


def _int8(cls, n, sparsity):
    return _linear(cls.from_dense(unstructured((300, 500), sparsity)), getattr(ours_cpu, f"prepare_{cls.format.replace('-', '_')}"),
                   ours_cpu.int8_matmul, n)


CASES = {
    "csr gemv": lambda: _csr(1, "plain"),
    "csr tile": lambda: _csr(40, "plain"),
    "csr panels by tile": lambda: _csr(300, "panels", (40, 300), 0.9),
    "csr panels by block": lambda: _csr(257, "panels", (300, 40), 0.9),
    "2:4": lambda: _linear(TwoFour.from_dense(two_four((300, 512))), ours_cpu.prepare_two_four,
                           ours_cpu.two_four_matmul, 24),
    "dense-int8 gemv": lambda: _int8(DenseInt8, 1, 0.0),
    "csr-int8 tile": lambda: _int8(CSRInt8, 33, 0.7),
    "bitmap-int8 gemv": lambda: _int8(BitmapInt8, 1, 0.7),
    "ffn two phases": lambda: _ffn(False, 64),
    "gated ffn by tile": lambda: _ffn(True, 300),
    "attention": lambda: _attention(100, 100, False),
    "causal attention": lambda: _attention(40, 72, True),
    "moe": lambda: _moe(48),
}
BACKENDS = ("openmp", "pool", "solo")


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with torch.inference_mode():
            return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_backend_and_thread_count_gives_one_threads_sums_bit_for_bit(case):
    run, ref = CASES[case]()
    one = _with_threads(1, run)
    torch.testing.assert_close(one.float(), ref().float(), rtol=1e-4, atol=1e-4)
    for backend in BACKENDS:
        with cpp.backend(backend):
            for threads in (2, 3, 4):
                assert torch.equal(_with_threads(threads, run), one), (backend, threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pinned_backend_runs_the_jobs_and_counts_them(backend):
    run, _ = CASES["csr tile"]()
    before = cpp.thread_stats()
    with cpp.backend(backend):
        _with_threads(2, run)
    assert getattr(cpp.thread_stats().since(before), f"{backend}_jobs") >= 1


@pytest.mark.parametrize("backend,up", [(1, "pool"), (2, "solo")])
def test_two_slow_waits_move_jobs_a_level_up(backend, up):
    import time
    lib = cpp.library()
    # below the limit (200 us), or shorter than the caller's own work: a quiet machine's waits
    assert not lib.sparse_cpu_waited(backend, 150_000, 10_000)
    assert not lib.sparse_cpu_waited(backend, 900_000, 1_000_000)
    time.sleep(0.11)  # no slow wait in the last 100 ms
    before = cpp.thread_stats()
    assert not lib.sparse_cpu_waited(backend, 300_000, 100_000)  # the scheduler's wait, not the work's: once is chance
    assert lib.sparse_cpu_waited(backend, 400_000, 100_000)  # twice within 100 ms: a busy machine
    after = cpp.thread_stats()
    assert after.since(before).slow_waits == 2 and after.backend in (up, "solo")


def test_concurrent_callers_share_the_pool_or_run_alone():
    run, _ = CASES["csr panels by block"]()
    expected = _with_threads(1, run)
    results = []

    def worker():
        for _ in range(20):
            results.append(_with_threads(2, run))
    with cpp.backend("pool"):
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 60 and all(torch.equal(r, expected) for r in results)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_gets_a_working_pool():
    run, _ = CASES["csr tile"]()
    with cpp.backend("pool"):
        expected = _with_threads(2, run)  # the parent's workers exist now
        pid = os.fork()
        if pid == 0:  # the child: the parent's workers are not here
            os._exit(0 if torch.equal(_with_threads(2, run), expected) else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_unknown_backend_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="'gpu'.*auto, openmp, pool, solo"), cpp.backend("gpu"):
        pass
