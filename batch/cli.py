"""Command line: ``python -m batch {run,status,merge}`` (see ``--help`` of each)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from batch.claims import DEFAULT_TTL_S
from batch.exit_codes import EXIT_OK, EXIT_RETRIABLE, EXIT_STOPPED, EXIT_USAGE
from batch.jobs import Shard, parse_shard
from batch.session import SessionOptions, ShardSession, describe_summary

log = logging.getLogger("batch")

RUN_EPILOG = """\
exit codes: 0 every line of the shard is done; 3 the valid lines are done but some lines are invalid or were
refused (errors/line-*.json; not retriable); 2 usage or configuration error; 1 or 143 (SIGTERM) retriable: run
the same command again and it resumes.
"""


class UsageError(Exception):
    """Bad arguments or configuration: exit code 2 with a message, no traceback."""


def resolve_shard(shard: str | None, num_shards: int | None, env: dict[str, str] | os._Environ) -> Shard:
    """``--shard I/N``, or ``--num-shards N`` with the index from ``JOB_COMPLETION_INDEX`` (Kubernetes Indexed Job)."""
    try:
        if shard is not None:
            return parse_shard(shard)
        if num_shards is not None:
            index = env.get("JOB_COMPLETION_INDEX")
            if index is None or not index.strip().isdigit():
                raise UsageError(
                    "--num-shards needs JOB_COMPLETION_INDEX (set by a Kubernetes Indexed Job); "
                    "elsewhere use --shard I/N"
                )
            return Shard(int(index), num_shards)
        return Shard(0, 1)
    except ValueError as error:
        raise UsageError(str(error)) from None


def execute_run(
    options: SessionOptions,
    *,
    engine: Any = None,
    model_dir: Path | None = None,
    offload: str = "auto",
    batch_size: int = 1,
    deterministic: bool = True,
    encode_workers: int | None = None,
    allow_model_change: bool = False,
    endpoint: str | None = None,
    concurrency: int = 4,
    retries: int = 5,
    request_timeout_s: float = 600.0,
    backoff_s: float = 1.0,
    handle_signals: bool = False,
) -> dict[str, Any]:
    """Run one shard; returns its summary (``exit_code`` included). ``engine``: an already loaded Engine."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not options.source.is_file():
        raise UsageError(f"input file {options.source} not found")
    settings: dict[str, Any] = (
        {"endpoint": endpoint, "concurrency": concurrency}
        if endpoint
        else {"batch_size": batch_size, "deterministic": deterministic}
    )
    session = ShardSession(options, "remote" if endpoint else "local", settings)
    if handle_signals:
        signal.signal(signal.SIGTERM, lambda *_: session.abort(EXIT_STOPPED, "SIGTERM: finishing the work in flight"))
    try:
        if not session.unfinished:
            pass  # nothing to do: no model to load
        elif endpoint:
            from batch.remote import EndpointClient, RemoteRunner

            client = EndpointClient(endpoint, timeout_s=request_timeout_s, retries=retries, backoff_s=backoff_s)
            RemoteRunner(session, client, concurrency).run()
        else:
            from batch.runner import LocalRunner, RunAborted

            if engine is None:
                engine = load_engine(model_dir, offload)
            settings["model"] = {"name": engine.model_name, "manifest_hash": engine.model_hash}
            conflict = session.outputs.pin_model(settings["model"], allow_model_change)
            if conflict:
                raise UsageError(conflict)
            try:
                LocalRunner(session, engine, batch_size, deterministic, encode_workers).run()
            except RunAborted as error:
                session.abort(EXIT_RETRIABLE, f"the device looks unusable ({error})")
    except UsageError as error:
        session.abort(EXIT_USAGE, str(error))
    finally:
        summary = session.close()
    return summary


def load_engine(model_dir: Path | None, offload: str) -> Any:
    """The engine on ``--model``, else on the worker's folder (``MODEL_DIR``, or the volume/baked default)."""
    from model_build.manifest import ModelFolderError
    from worker.engine import Engine
    from worker.model_location import prepare_model_dir

    try:
        folder = model_dir if model_dir is not None else prepare_model_dir()
        return Engine(folder, offload=offload)
    except (ModelFolderError, ValueError, OSError) as error:
        raise UsageError(f"no model: {error} (pass --model DIR or set MODEL_DIR)") from None


def add_run_parser(commands: argparse._SubParsersAction) -> None:
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
    run.add_argument("--offload", default=os.environ.get("OFFLOAD", "auto"), help="auto|none|model|sequential")
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
    run.add_argument("--request-timeout", type=float, default=600.0, help="seconds per remote request")
    run.add_argument("--claim-ttl", type=float, default=DEFAULT_TTL_S, help="seconds before a silent claim is stale")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--max-seconds", type=float, help="stop after the call in flight once this long has passed (exit 143)"
    )


def _run(args: argparse.Namespace) -> int:
    if args.endpoint and args.model:
        raise UsageError("--endpoint and --model exclude each other: the endpoint's worker has its own model")
    options = SessionOptions(
        source=args.input,
        out=args.out,
        shard=resolve_shard(args.shard, args.num_shards, os.environ),
        claim_ttl_s=args.claim_ttl,
        progress=not args.no_progress,
        max_seconds=args.max_seconds,
    )
    summary = execute_run(
        options,
        model_dir=args.model,
        offload=args.offload,
        batch_size=args.batch_size,
        deterministic=args.deterministic,
        encode_workers=args.encode_workers,
        allow_model_change=args.allow_model_change,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        retries=args.retries,
        request_timeout_s=args.request_timeout,
        handle_signals=True,
    )
    print(describe_summary(summary), file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))  # one machine-readable line (also in _batch/shards/summary-*.json)
    return summary["exit_code"]


def _status(args: argparse.Namespace) -> int:
    from batch.report import format_status, run_status

    try:
        report = run_status(args.out, args.input, args.num_shards)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def _merge(args: argparse.Namespace) -> int:
    from batch.report import merge

    try:
        result = merge(args.out)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    print(f"{result['metadata']}: {result['images']} images of {result['items']} items")
    for name in result["skipped_damaged"]:
        print(f"skipped damaged sidecar {name} (a run will make that item again)", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch", description="Resumable, sharded JSONL generation.")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"))
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_parser(commands)
    status = commands.add_parser("status", help="done / failed / remaining per shard")
    status.add_argument("out", type=Path)
    status.add_argument("--input", type=Path, help="the JSONL file (default: the one the run recorded)")
    status.add_argument("--num-shards", type=int, help="default: the run's")
    status.add_argument("--json", action="store_true")
    merge = commands.add_parser("merge", help="write <out>/metadata.jsonl (Hugging Face imagefolder) for the run")
    merge.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"run": _run, "status": _status, "merge": _merge}[args.command](args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
