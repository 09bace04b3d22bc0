"""The README's promises that code can check: its settings table is the settings object's."""

from __future__ import annotations

from pathlib import Path

from core.settings import SETTINGS_FIELDS
from core.settings_table import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def readme_settings_table() -> str:
    text = README.read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip()


def test_readme_lists_every_setting_as_the_code_declares_it() -> None:
    # Regenerate with: python -m core.settings_table --write README.md
    assert readme_settings_table() == settings_table()
    for spec in SETTINGS_FIELDS:
        assert f"`{spec.metadata['env']}`" in readme_settings_table()
