"""The layout's promises: the production packages import each other one way, and the core needs no torch.

``python -m tests.import_graph`` prints the same graph for a reader.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.import_graph import LAYERS, PACKAGES, WORKER_GROUPS, find_cycles, module_graph, upward_imports

ROOT = Path(__file__).resolve().parents[1]


def test_production_imports_have_no_cycle() -> None:
    graph = module_graph(ROOT)
    assert graph, "no modules found"
    assert find_cycles(graph) == []


def test_packages_import_only_downwards() -> None:
    """core <- model_build <- worker <- batch, and inside worker request <- output <- prompting <- adapters <- model <-
    generation <- the entry points; bench may use anything, nothing production imports tests or bench."""
    graph = module_graph(ROOT)
    assert upward_imports(graph) == []
    assert not any(target.split(".")[0] in ("tests", "bench") for targets in graph.values() for target in targets)
    assert set(PACKAGES) == set(LAYERS)
    groups = {path.name for path in (ROOT / "worker").iterdir() if (path / "__init__.py").exists()}
    assert groups == set(WORKER_GROUPS), "a new worker group needs its place in tests/import_graph.WORKER_GROUPS"


def test_the_core_imports_without_torch_diffusers_or_pydantic() -> None:
    code = (
        "import sys\n"
        "sys.modules.update(dict.fromkeys(['torch', 'diffusers', 'transformers', 'pydantic', 'PIL'], None))\n"
        "import core.errors, core.settings, core.results, core.safetensors_files, core.hub_names\n"
        "import core.url_fetch, core.url_addresses, core.url_sockets, core.sha256_pins, core.quiet_logs\n"
        "import worker.adapters.lora.sources\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_job_enters_the_engine_once_and_nothing_calls_back_into_it(dev_model_dir: Path) -> None:
    """The engine orchestrates: the handler calls it once per job; the parts it calls never call back into it."""
    from tests.job_path import ENGINE, JOB, job_path

    path = job_path(dev_model_dir, JOB)
    assert path.calls_into(ENGINE) == {"worker/handler.py": 1}
    assert {"worker/generation/stages.py", "worker/generation/decode.py"} <= set(path.engine_calls)
