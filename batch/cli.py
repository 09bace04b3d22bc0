"""Command line: ``python -m batch {run,status,merge,gallery}`` (see ``--help`` of each)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from batch.claims import DEFAULT_TTL_S
from batch.exit_codes import EXIT_OK, EXIT_USAGE
from batch.jobs import Shard, parse_shard
from batch.options import DEFAULT_MIN_FREE_MB, EndpointOptions, LocalEngineOptions, RunKind, RunOptions
from core.errors import ConfigurationError
from core.quiet_logs import drop_unactionable_warnings
from core.settings import BATCH, Settings, load_settings

log = logging.getLogger("batch")

RUN_EPILOG = """\
exit codes: 0 every line of the shard is done; 3 the valid lines are done but some lines are invalid or were
refused (errors/line-*.json; not retriable); 2 usage or configuration error (bad option, no input or model, an
output folder that is read-only, a file or full); 1 or 143 (SIGTERM) retriable: run the same command again and it
resumes.
"""


def resolve_shard(shard: str | None, num_shards: int | None, completion_index: int | None) -> Shard:
    """``--shard I/N``, or ``--num-shards N`` with the index from ``JOB_COMPLETION_INDEX`` (Kubernetes Indexed Job)."""
    try:
        if shard is not None:
            return parse_shard(shard)
        if num_shards is not None:
            if completion_index is None:
                raise ConfigurationError(
                    "--num-shards needs JOB_COMPLETION_INDEX (set by a Kubernetes Indexed Job); "
                    "elsewhere use --shard I/N"
                )
            return Shard(completion_index, num_shards)
        return Shard(0, 1)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None


def add_run_parser(commands: argparse._SubParsersAction, settings: Settings | None = None) -> None:
    run = commands.add_parser(
        "run",
        help="generate the lines of one shard (resumable)",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("input", type=Path, help="JSONL file: one worker request per line, plus an optional id")
    run.add_argument("--out", type=Path, required=True, help="output folder (shared by all shards)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--shard", help="I/N: this process does the lines n with (n-1) %% N == I")
    where.add_argument("--num-shards", type=int, help="N, with the index from JOB_COMPLETION_INDEX")
    run.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (4-8 on a large GPU)")
    run.add_argument("--model", type=Path, help="converted model folder (default: MODEL_DIR, as the worker)")
    run.add_argument("--refiner", type=Path, help="converted SDXL refiner folder (default: REFINER_DIR, as the worker)")
    offload = settings.offload if settings is not None else "auto"
    run.add_argument("--offload", default=offload, help="auto|none|model|sequential (default: OFFLOAD, else auto)")
    run.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pad every call to --batch-size images so an image never depends on its batch mates (default on)",
    )
    run.add_argument(
        "--encode-workers",
        type=int,
        help="processes encoding images (default: 1 per 4 CPUs, 1-4); 0 encodes in the writer thread",
    )
    run.add_argument(
        "--allow-model-change",
        action="store_true",
        help="resume into a folder started with another model (its done items are kept as they are)",
    )
    run.add_argument("--endpoint", help="send lines to a RunPod-style endpoint URL instead of a local model")
    run.add_argument("--concurrency", type=int, default=4, help="remote requests in flight (with --endpoint)")
    run.add_argument("--retries", type=int, default=5, help="retries per remote request (with --endpoint)")
    run.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds for one line on the endpoint, its retries included",
    )
    run.add_argument("--claim-ttl", type=float, default=DEFAULT_TTL_S, help="seconds before a silent claim is stale")
    run.add_argument(
        "--min-free-mb",
        type=float,
        default=DEFAULT_MIN_FREE_MB,
        help="free space the output folder needs at the start, MiB (less: exit code 2)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--max-seconds", type=float, help="stop after the call in flight once this long has passed (exit 143)"
    )


def run_options(args: argparse.Namespace, settings: Settings) -> RunOptions:
    return RunOptions(
        source=args.input,
        out=args.out,
        shard=resolve_shard(args.shard, args.num_shards, settings.job_completion_index),
        claim_ttl_s=args.claim_ttl,
        progress=not args.no_progress,
        max_seconds=args.max_seconds,
        min_free_mb=args.min_free_mb,
        handle_signals=True,
    )


def run_kind(args: argparse.Namespace, settings: Settings) -> RunKind:
    if args.endpoint and (args.model or args.refiner):
        raise ConfigurationError(
            "--endpoint and --model/--refiner exclude each other: the endpoint's worker has its own model"
        )
    if args.endpoint:
        return EndpointOptions(
            url=args.endpoint,
            api_key=settings.runpod_api_key,
            concurrency=args.concurrency,
            retries=args.retries,
            request_timeout_s=args.request_timeout,
        )
    return LocalEngineOptions(
        model_dir=args.model,
        refiner_dir=args.refiner,
        offload=args.offload,
        batch_size=args.batch_size,
        deterministic=args.deterministic,
        encode_workers=args.encode_workers,
        allow_model_change=args.allow_model_change,
        settings=settings,
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from batch.execute import run_shard

    summary = run_shard(run_options(args, settings), run_kind(args, settings))
    print(summary.describe(), file=sys.stderr)
    print(summary.to_json(indent=None).decode(), end="")  # one machine-readable line (also in _batch/shards/)
    return summary.exit_code


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from batch.report import format_status, run_status

    report = run_status(args.out, args.input, args.num_shards)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def _merge(args: argparse.Namespace, settings: Settings) -> int:
    from batch.report import merge

    result = merge(args.out, args.input)
    print(f"{result['metadata']}: {result['images']} images of {result['items']} items")
    for name in result["skipped_damaged"]:
        print(f"skipped damaged sidecar {name} (a run will make that item again)", file=sys.stderr)
    if result["not_in_input"]:
        print(
            f"left out {result['not_in_input']} item(s) made from lines since removed from or changed in "
            f"{result['input']}",
            file=sys.stderr,
        )
    return EXIT_OK


def _gallery(args: argparse.Namespace, settings: Settings) -> int:
    from batch.gallery import build_gallery

    def progress(done: int, total: int) -> None:
        if done == total or done % 500 == 0:  # a large run's first build makes thousands of thumbnails
            print(f"thumbnails: {done}/{total}", file=sys.stderr)

    result = build_gallery(
        args.out, args.input, page_size=args.page_size, thumb_side=args.thumb_size, progress=progress
    )
    for problem in result["thumbnail_errors"]:
        print(f"no thumbnail: {problem}", file=sys.stderr)
    print(
        f"{result['index']}: {result['lines']} lines ({result['done']} done, {result['failed']} failed, "
        f"{result['remaining']} not done), {result['images']} images, {result['thumbnails_made']} new thumbnails; "
        f"open {Path(result['index']).resolve().as_uri()}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    drop_unactionable_warnings()
    try:
        settings = load_settings(command=BATCH)  # the batch runner's variables, read once
    except ConfigurationError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog="python -m batch", description="Resumable, sharded JSONL generation.")
    parser.add_argument("--log-level", default=settings.log_level or "WARNING", help="default: LOG_LEVEL, else WARNING")
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_parser(commands, settings)
    status = commands.add_parser("status", help="done / failed / remaining per shard, for the current input")
    status.add_argument("out", type=Path)
    status.add_argument("--input", type=Path, help="the JSONL file (default: the one the run recorded)")
    status.add_argument("--num-shards", type=int, help="default: the run's")
    status.add_argument("--json", action="store_true")
    merge = commands.add_parser(
        "merge", help="write <out>/metadata.jsonl (Hugging Face imagefolder) for the done items of the current input"
    )
    merge.add_argument("out", type=Path)
    merge.add_argument("--input", type=Path, help="the JSONL file (default: the one the run recorded)")
    gallery = commands.add_parser(
        "gallery", help="write <out>/index.html: thumbnails, prompts, settings and errors of the current input"
    )
    gallery.add_argument("out", type=Path)
    gallery.add_argument("--input", type=Path, help="the JSONL file (default: the one the run recorded)")
    gallery.add_argument("--page-size", type=int, default=100, help="cards per page (default 100)")
    gallery.add_argument("--thumb-size", type=int, default=256, help="thumbnails' longer side, pixels (default 256)")
    args = parser.parse_args(argv)
    try:
        level = args.log_level.upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ConfigurationError(
                f"--log-level / LOG_LEVEL {args.log_level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return {"run": _run, "status": _status, "merge": _merge, "gallery": _gallery}[args.command](args, settings)
    except ConfigurationError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USAGE
