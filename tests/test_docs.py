"""The README and the docs site: the site builds with `mkdocs build --strict` (no warning, no broken link),
the API reference covers the public API, the README stays short with working links, and every figure in them
comes from a committed results file that names its CPU, kernel ISA and threads (benchmarks/figures.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import figures

ROOT = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly(tmp_path):
    # the docs packages come with the `test` extra: without them this fails, it does not skip
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        __import__(module)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "WARNING" not in log, log[-4000:]
    assert (tmp_path / "site" / "reference" / "prune" / "index.html").is_file()
    assert (tmp_path / "site" / "plots" / "frontier" / "frontier.png").is_file()  # docs/hooks.py published it


@pytest.mark.parametrize("package", ["prune", "sparse_ops"])
def test_the_reference_documents_every_exported_name(package):
    exports = __import__(package)._EXPORTS  # public name -> defining module, what __all__ is made from
    page = (ROOT / "docs" / "reference" / f"{package}.md").read_text()
    documented = set(re.findall(r"^::: (\S+)$", page, flags=re.MULTILINE))
    assert {f"{module}.{name}" for name, module in exports.items()} <= documented


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README.md links to {target}, which does not exist"
    for journey in ("Pruner(", "prune oneshot", "prune recover", "prune convert", "from_pretrained",
                    "prune bench"):
        assert journey in text


def test_every_figure_comes_from_a_results_file_that_names_its_hardware():
    assert figures.problems() == []


# -- the check itself catches what it is there to catch (so it cannot pass vacuously)
FAMILIES = "benchmarks/results/families/families.csv"
MOE = FAMILIES + "#moe_e8_k2_h1536"  # only the MoE's rows


def test_a_figure_is_matched_at_its_own_precision():
    numbers = figures.source_numbers(MOE)  # the MoE at 1 token: 2.8666553387381044
    assert figures.in_source(2.87, 2, "x", numbers) and figures.in_source(2.867, 3, "x", numbers)
    assert not figures.in_source(2.27, 2, "x", numbers)  # the stale figure issue 31 found
    assert figures.in_source(2.27, 2, "x", figures.source_numbers(FAMILIES))  # another row of the whole file
    assert figures.in_source(90.0, 0, "%", (0.9,)) and figures.in_source(89.6, 1, "ms", (0.0896,))
    tokens = [t for t, *_ in figures.figures("at 4096x4096 on L6 with `9.99x` ran 2.87x, 90% and 12 ms")]
    assert tokens == ["2.87x", "90%", "12"]


def test_a_stale_figure_an_unsourced_one_and_a_source_without_hardware_are_reported():
    sourced = f"The MoE ran 2.27x dense. <!-- source: {MOE} -->\n"
    assert any("'2.27x' is in none of" in p for p in figures.check_document("d.md", sourced))
    assert figures.check_document("d.md", sourced.replace("2.27x", "2.87x")) == []
    assert any("has no <!-- source" in p for p in figures.check_document("d.md", "It ran 2.27x dense.\n"))
    assert figures.check_document("d.md", "It ran 2.27x. <!-- not-measured: a published figure -->\n") == []
    no_isa = "It ran 1.50x. <!-- source: benchmarks/results/ffn/ffn.json -->\n"  # ffn.json has no kernel_isa
    assert any("does not name kernel_isa" in p for p in figures.check_document("d.md", no_isa))
    assert figures.missing_hardware(FAMILIES) == []  # a CSV is covered by the JSON beside it
    assert any("no row of" in p for p in figures.check_document("d.md", sourced.replace("moe_e8", "nothing")))


def test_a_generated_region_must_match_its_renderer():
    fresh = figures.regenerate("<!-- figures:begin families -->\n<!-- figures:end families -->\n")
    assert "| `moe_e8_k2_h1536` |" in fresh and figures.check_document("d.md", fresh) == []
    stale = fresh.replace("2.87x", "2.27x")
    assert any("stale" in p for p in figures.check_document("d.md", stale))
