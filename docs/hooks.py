"""MkDocs hook: publish the plots under benchmarks/results/ as plots/... so pages can show them.

The PNGs stay where the benchmarks write them (one copy, committed once); a page links to
`plots/<study>/<plot>.png` relative to the docs root.
"""
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.rglob("*.png")):
        uri = "plots/" + png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files
