"""Exit codes of ``python -m batch run``, chosen for a Kubernetes podFailurePolicy.

Only ``EXIT_INVALID_LINES`` is final for an index (the manifest's ``FailIndex`` rule): running the
same lines again cannot fix them. ``EXIT_USAGE`` is final for the whole Job (``FailJob``): every
index would fail the same way. Everything else (including Python's own 1 for an uncaught
exception and 137 for a SIGKILL or OOM kill) is retriable, and a retry resumes where it stopped.
"""

EXIT_OK = 0  # every line of the shard is done
EXIT_RETRIABLE = 1  # something failed that a retry may fix (crash, OOM, endpoint down); done items are kept
EXIT_USAGE = 2  # bad arguments, missing model folder or input file (argparse's own code)
EXIT_INVALID_LINES = 3  # all valid lines done; some lines are invalid or were refused (see errors/)
EXIT_STOPPED = 143  # stopped by SIGTERM (128 + 15) after finishing the work in flight
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT, 128 + 2): after the work in flight, or at once on a second one
