"""The README's sampler and schedule-type tables, generated from :mod:`worker.request.samplers` (a test keeps the
README equal to them).

python -m worker.request.sampler_table --write README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from worker.request.samplers import A1111_ALIASES, MODEL_SCHEDULE, SAMPLERS, SCHEDULE_NAMES, SCHEDULES, schedules_of

TABLE_START, TABLE_END = "<!-- sampler-table:start -->", "<!-- sampler-table:end -->"


def _names(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def sampler_table() -> str:
    rows = [
        "| sampler | also accepted | diffusers class | `Automatic` | schedule types | own lists | eta | calls/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, spec in SAMPLERS.items():
        aliases = (*spec.aliases, *A1111_ALIASES.get(name, ()))
        takes = schedules_of(name)
        schedules = "all" if len(takes) == len(SCHEDULES) else ", ".join(takes)
        custom = ", ".join(f"`{kind}`" for kind in ("timesteps", "sigmas") if kind in spec.custom) or "-"
        eta = "-" if spec.eta is None else f"{spec.eta:g}"
        automatic = "the model's config" if spec.automatic == MODEL_SCHEDULE else spec.automatic
        rows.append(
            f"| `{name}` | {_names(aliases) or '-'} | {spec.diffusers_class} | {automatic} | {schedules} | {custom} | "
            f"{eta} | {spec.calls_per_step} |"
        )
    return "\n".join(rows)


def schedule_table() -> str:
    rows = ["| schedule type | also accepted | what runs |", "| --- | --- | --- |"]
    for label, spec in SCHEDULES.items():
        rows.append(f"| `{label}` | {_names(SCHEDULE_NAMES[label])} | {spec.does} |")
    return "\n".join(rows)


def tables() -> str:
    return f"{sampler_table()}\n\n{schedule_table()}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:  # python -m worker.request.sampler_table --write README.md
        readme = Path(sys.argv[2])
        text = readme.read_text()
        head, _, rest = text.partition(TABLE_START)
        _, _, tail = rest.partition(TABLE_END)
        readme.write_text(f"{head}{TABLE_START}\n{tables()}\n{TABLE_END}{tail}")
    else:
        print(tables())
