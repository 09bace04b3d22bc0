"""The README's promises that code can check: its settings table is the settings object's, its performance table
is what the committed result files say."""

from __future__ import annotations

from pathlib import Path

from bench import perf_table
from core.settings import SETTINGS_FIELDS
from core.settings_table import settings_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def readme_settings_table() -> str:
    text = README.read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip()


def test_readme_lists_every_setting_as_the_code_declares_it() -> None:
    # Regenerate with: python -m core.settings_table --write README.md
    assert readme_settings_table() == settings_table()
    for spec in SETTINGS_FIELDS:
        assert f"`{spec.metadata['env']}`" in readme_settings_table()


def test_the_performance_table_is_what_its_result_files_say() -> None:
    # Regenerate with: python bench/perf_table.py --write README.md
    text = README.read_text()
    block = perf_table.BLOCK.search(text)
    assert block, "README has no perf-table block"
    files = [ROOT / name for name in block["files"].split()]
    assert all(path.is_file() for path in files), "the perf-table marker names a file that is not committed"
    rendered = f"<!-- perf-table: {block['files']} -->\n{perf_table.render(files)}\n<!-- perf-table:end -->"
    assert block.group(0) == rendered
