"""Run one job file through the worker's handler and write its images to disk.

    python -m worker.run_job test_input.json --out outputs/demo [--model models/sdxl-dev]

The same handler RunPod calls, in process; the images and the output's metadata land in ``--out``.
Exits 1 when the job returns an error.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path

from core.results import EXTENSIONS as FORMAT_EXTENSIONS
from core.results import MIME_TYPES
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    job = json.loads(args.job.read_text())
    worker = Worker()
    worker.start(args.model)
    if worker.startup_error:
        print(f"error: {worker.startup_error}", file=sys.stderr)
        return 1
    output = worker.handle({"id": args.job.stem, "input": job.get("input")})
    if "error" in output:
        print(f"error: {output['error']}", file=sys.stderr)
        return 1
    paths = write_images(output, args.out, args.job.stem)
    (args.out / f"{args.job.stem}.json").write_text(json.dumps(output["metadata"], indent=2) + "\n")
    for path in paths:
        print(f"wrote {path}")
    warning = output["metadata"].get("warning")
    if warning:
        print(f"note: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
