"""Run one job file through the worker's handler and write its images to disk.

    python -m worker.run_job test_input.json --out outputs/demo [--model models/sdxl-dev]

The same handler RunPod calls, in process, with the worker's settings from the environment; the images
(``<job>-<k>.<ext>``) and the output's metadata (``<job>.metadata.json``) land in ``--out``, never over the job
file itself. Exits 1 when the job returns an error, 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path

from core.errors import ConfigurationError
from core.quiet_logs import drop_unactionable_warnings
from core.results import EXTENSIONS as FORMAT_EXTENSIONS
from core.results import MIME_TYPES
from core.settings import WORKER, load_settings
from worker.handler import Worker

# mime type -> file extension, from the one table in core.results
EXTENSIONS = {MIME_TYPES[image_format]: extension for image_format, extension in FORMAT_EXTENSIONS.items()}


def write_images(output: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, uri in enumerate(output["images"]):
        header, payload = uri.split(",", 1)
        extension = EXTENSIONS[header.removeprefix("data:").removesuffix(";base64")]
        path = out_dir / f"{stem}-{k}.{extension}"
        path.write_bytes(base64.b64decode(payload))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.run_job", description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help='a JSON file {"input": {...}} such as test_input.json')
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="converted model folder (default: MODEL_DIR / the worker's rule)")
    args = parser.parse_args(argv)
    drop_unactionable_warnings()
    try:
        settings = load_settings(command=WORKER)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level or logging.INFO, format="%(levelname)s %(message)s")
    metadata_path = args.out / f"{args.job.stem}.metadata.json"  # a name no job file of that stem can have

    job = json.loads(args.job.read_text())
    worker = Worker(settings)
    worker.start(args.model)
    if worker.startup_error:
        print(f"error: {worker.startup_error}", file=sys.stderr)
        return 1
    output = worker.handle({"id": args.job.stem, "input": job.get("input")})
    if "error" in output:
        print(f"error: {output['error']}", file=sys.stderr)
        return 1
    paths = write_images(output, args.out, args.job.stem)
    metadata_path.write_text(json.dumps(output["metadata"], indent=2) + "\n")
    for path in [*paths, metadata_path]:
        print(f"wrote {path}")
    warning = output["metadata"].get("warning")
    if warning:
        print(f"note: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
