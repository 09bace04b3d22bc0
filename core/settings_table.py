"""The README's table of environment variables, generated from :data:`core.settings.SETTINGS_FIELDS`:
``python -m core.settings_table --write README.md`` (``tests/test_readme.py`` checks the two agree)."""

from __future__ import annotations

from pathlib import Path

from core.settings import SETTINGS_FIELDS


def settings_table() -> str:
    """The README's table of environment variables, generated from the fields."""
    rows = ["| variable | default | read by | meaning |", "| --- | --- | --- | --- |"]
    for spec in SETTINGS_FIELDS:
        default = spec.metadata["default"]
        commands = ", ".join(spec.metadata["read_by"])
        rows.append(
            f"| `{spec.metadata['env']}` | {f'`{default}`' if default else '—'} | {commands} | {spec.metadata['doc']} |"
        )
    return "\n".join(rows)


TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def write_readme_table(readme: Path) -> None:
    """Replace the table between the README's two markers with :func:`settings_table`."""
    text = readme.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    readme.write_text(f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:  # python -m core.settings_table --write README.md
        write_readme_table(Path(sys.argv[2]))
    else:
        print(settings_table())
