"""Numbers README shows are what their commands print."""

from __future__ import annotations

from pathlib import Path

from bench.footprint import rows as footprint_rows

ROOT = Path(__file__).parents[1]


def test_readme_costs_table_is_what_bench_footprint_prints() -> None:
    readme = (ROOT / "README.md").read_text()
    table = "\n".join(footprint_rows("default", 32768))
    assert table in readme, "README's cost table differs from `python bench/footprint.py`: paste its output"
