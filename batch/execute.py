"""The one entry point of a batch run: ``run_shard(RunOptions, LocalEngineOptions | EndpointOptions) -> summary``.

The CLI, the benchmarks and the tests all call this. It opens the shard's session (the output
folder, the input, the claims), hands it to the runner of the asked kind (:func:`batch.runner.run_local`
or :func:`batch.remote.run_remote`) and returns the summary the session wrote on leaving, with its
``exit_code``. A configuration problem found before the session exists (a bad option, no input, an
output folder that cannot be written) is raised as ``ConfigurationError``; one found after (no model,
a model that differs from the folder's) ends the run with ``EXIT_USAGE`` and a summary.
"""

from __future__ import annotations

import signal
from typing import Any

from batch.exit_codes import EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_USAGE
from batch.options import EndpointOptions, LocalEngineOptions, RunKind, RunOptions
from batch.records import ShardSummary
from batch.session import ShardSession
from core.errors import ConfigurationError


def run_shard(options: RunOptions, kind: RunKind) -> ShardSummary:
    """Run one shard of ``options.source`` into ``options.out`` the way ``kind`` says; returns the summary."""
    if not options.source.is_file():
        raise ConfigurationError(f"input file {options.source} not found")
    with ShardSession(options, kind.mode, kind.summary_settings()) as session:
        previous = _stop_on_signals(session) if options.handle_signals else {}
        try:
            if not session.unfinished:
                pass  # nothing to do: no model to load, no endpoint to call
            elif isinstance(kind, EndpointOptions):
                from batch.remote import run_remote

                run_remote(session, kind)
            elif isinstance(kind, LocalEngineOptions):
                from batch.runner import run_local  # imports torch: only when there is local work

                run_local(session, kind)
            else:
                raise TypeError(f"unknown run kind {type(kind).__name__}")
        except ConfigurationError as error:
            session.abort(EXIT_USAGE, error.message)
        except KeyboardInterrupt:  # a second Ctrl-C: the call in flight is abandoned, its items stay not done
            session.abort(EXIT_INTERRUPTED, "Ctrl-C twice: stopped at once, the call in flight was abandoned")
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
    assert session.summary is not None
    return session.summary


def _stop_on_signals(session: ShardSession) -> dict[int, Any]:
    """SIGTERM and Ctrl-C finish the call in flight, write its images and the summary, and stop (exit 143 / 130).

    A second Ctrl-C stops at once (KeyboardInterrupt, caught by :func:`run_shard`): the summary is still written and
    every claim released, so the next run resumes without waiting for a stale claim. Returns the replaced handlers.
    """

    def stop(number: int, frame: Any) -> None:
        if number == signal.SIGINT and session.stopping.is_set():
            raise KeyboardInterrupt
        if number == signal.SIGINT:
            reason = "Ctrl-C: finishing the call in flight (Ctrl-C again stops at once)"
            session.abort(EXIT_INTERRUPTED, reason)
        else:
            session.abort(EXIT_STOPPED, "SIGTERM: finishing the call in flight")

    return {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
