"""`prune convert` keeps peak resident memory under baseline + 3 x the largest tensor (the small CI version of
``benchmarks/convert_memory.py``: a ~100 MB checkpoint whose largest tensor is 40 MB)."""
from benchmarks.convert_memory import run

MB = 2**20


def test_convert_peak_memory_stays_under_three_largest_tensors(tmp_path):
    rows = run(total_bytes=100 * MB, largest_bytes=40 * MB, sparsity=0.9, formats=["csr", "auto"],
               workdir=str(tmp_path))
    for row in rows:
        assert row.tensors == 4 and row.largest_bytes == 40 * MB
        # the baseline process imports what `prune convert` imports (torch: several hundred MB)
        assert 100 * MB < row.baseline_rss < row.peak_rss
        assert row.peak_rss <= row.bound, (f"{row.format}: peak {row.peak_rss / MB:.0f} MiB > baseline "
                                           f"{row.baseline_rss / MB:.0f} + 3 x {row.largest_bytes / MB:.0f}")
    assert list(tmp_path.iterdir()) == []  # the synthetic checkpoint is deleted


def test_the_bound_catches_a_converter_that_reads_everything(tmp_path, monkeypatch):
    """The measurement can fail: a "converter" that reads the whole 100 MB file (2.5 x the largest tensor) and
    copies it goes over the bound."""
    import benchmarks.convert_memory as cm

    hog = ("import sys\n"
           "if len(sys.argv) > 1:\n"
           "    data = open(sys.argv[2], 'rb').read(); copy = bytearray(data)\n"
           "    open(sys.argv[4], 'wb').close()\n")
    monkeypatch.setattr(cm, "CHILD", cm.CHILD.replace("rc = ", hog + "rc = 0 and "))
    (row,) = run(total_bytes=100 * MB, largest_bytes=40 * MB, sparsity=0.9, formats=["csr"],
                 workdir=str(tmp_path))
    assert row.peak_rss > row.bound
