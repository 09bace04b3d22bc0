"""Command line: ``python -m model_build {dev-checkpoint,convert,verify} ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_build.convert import DTYPES, ConversionError, convert
from model_build.dev_model import DEV_MODEL_NOTICE, write_dev_checkpoint
from model_build.manifest import ModelFolderError, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_build", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev-checkpoint", help="write the built-in dev model as one single-file checkpoint")
    dev.add_argument("output", type=Path)
    dev.add_argument("--full-size", action="store_true", help="the real SDXL base architecture (~7 GB, fp16)")

    conv = commands.add_parser("convert", help="convert a checkpoint into a verified Diffusers folder")
    conv.add_argument("source", help="local .safetensors path")
    conv.add_argument("--output", type=Path, required=True)
    conv.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    conv.add_argument("--force", action="store_true", help="convert again even if the output is up to date")

    ver = commands.add_parser("verify", help="check a converted folder against its manifest")
    ver.add_argument("folder", type=Path)
    ver.add_argument("--full", action="store_true", help="rehash every file (slow); default checks sizes")

    args = parser.parse_args(argv)
    try:
        if args.command == "dev-checkpoint":
            path = write_dev_checkpoint(args.output, full_size=args.full_size)
            print(f"wrote {path} ({DEV_MODEL_NOTICE})")
        elif args.command == "convert":
            print(convert(Path(args.source), args.output, dtype=args.dtype, force=args.force).message)
        elif args.command == "verify":
            manifest = verify(args.folder, full=args.full)
            print(f"{args.folder}: OK ({len(manifest['files'])} files{', rehashed' if args.full else ''})")
    except (ConversionError, ModelFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
