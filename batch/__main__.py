"""``python -m batch run JOBS.jsonl --out DIR [--shard I/N | --num-shards N] ...``, ``status DIR``, ``merge DIR``."""

import sys

from batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
