"""Command line: ``python -m model_build COMMAND ...``: convert, verify, inspect, and the dev-* writers.

    python -m model_build convert SOURCE --output models/NAME [--dtype fp16|bf16|fp32] [--vae PATH] [--force]
                                  [--sha256 HEX] [--vae-sha256 HEX] [--cache-dir DIR] [--lock-timeout S]
                                  [--prediction-type epsilon|v_prediction] [--[no-]zero-terminal-snr]
    python -m model_build verify models/NAME [--full]
    python -m model_build inspect SOURCE
    python -m model_build dev-checkpoint OUT.safetensors [--full-size] [--refiner | --inpainting] [--v-prediction]
    python -m model_build dev-lora OUT.safetensors --model models/sdxl-dev [--kohya] [--kind loha|lokr] [--rank R]
    python -m model_build dev-controlnet OUT.safetensors [--full-size] [--diffusers-layout]
    python -m model_build dev-embedding OUT.safetensors [--model models/sdxl-dev] [--vectors N] [--sd15]
    python -m model_build dev-ip-adapter OUT_DIR [--full-size]

SOURCE is an SDXL checkpoint or an SDXL ControlNet (told apart by its tensors; a ControlNet converts into a
ControlNetModel folder for CONTROLNET_DIR).

SOURCE is a local .safetensors path, hf://<owner>/<repo>/<file>@<40-hex commit>, or an https:// URL.

Exit codes: 0 done, 1 the checkpoint or the model folder is refused (the message says why),
2 configuration: a bad option, or an output that cannot be written (read-only, under a file, full disk).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.errors import ConfigurationError, WorkerError, first_line
from core.quiet_logs import drop_unactionable_warnings
from core.settings import CONVERT, load_settings
from model_build.prediction import PREDICTION_TYPES
from model_build.source import default_cache_dir

EXIT_OK, EXIT_REFUSED, EXIT_CONFIGURATION = 0, 1, 2

SOURCE_HELP = "local .safetensors path, hf://<owner>/<repo>/<file>@<40-hex commit>, or https:// URL"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_build",
        description=(__doc__ or "").replace("``", ""),  # reStructuredText literals read as plain text in a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the result and errors")
    commands = parser.add_subparsers(dest="command", required=True)

    conv = commands.add_parser("convert", help="convert a checkpoint into a verified Diffusers folder")
    conv.add_argument("source", help=SOURCE_HELP)
    conv.add_argument("--output", type=Path, required=True, help="the model folder to create, e.g. models/NAME")
    conv.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="weights on disk (fp16)")
    conv.add_argument("--vae", help="a separate SDXL VAE .safetensors that replaces the checkpoint's (same forms)")
    conv.add_argument("--sha256", help="expected sha256 of SOURCE, checked before it is used")
    conv.add_argument("--vae-sha256", help="expected sha256 of the --vae file")
    conv.add_argument("--force", action="store_true", help="convert again even if the output is up to date")
    conv.add_argument("--cache-dir", type=Path, help="download cache (default $MODEL_BUILD_CACHE or ~/.cache/...)")
    conv.add_argument("--lock-timeout", type=float, help="seconds to wait for another conversion into OUTPUT")
    conv.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="what the UNet predicts, for files without the v_pred marker (default: the file's markers, else epsilon)",
    )
    conv.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        help="v-prediction trained on a zero-terminal-SNR schedule (default: the file's ztsnr marker)",
    )

    ver = commands.add_parser("verify", help="check a converted folder against its manifest")
    ver.add_argument("folder", type=Path)
    ver.add_argument("--full", action="store_true", help="rehash every file (slow); default checks sizes")

    ins = commands.add_parser("inspect", help="say what a checkpoint is and whether it would convert (no writing)")
    ins.add_argument("source", help=SOURCE_HELP)
    ins.add_argument("--sha256", help="expected sha256 of SOURCE")
    ins.add_argument("--cache-dir", type=Path)

    dev = commands.add_parser("dev-checkpoint", help="write the built-in dev model as one single-file checkpoint")
    dev.add_argument("output", type=Path)
    dev.add_argument("--full-size", action="store_true", help="the real SDXL base architecture (~7 GB, fp16)")
    kind = dev.add_mutually_exclusive_group()
    kind.add_argument("--refiner", action="store_true", help="the matching refiner (same VAE and OpenCLIP encoder)")
    kind.add_argument("--inpainting", action="store_true", help="the matching inpainting model (9-channel UNet)")
    dev.add_argument(
        "--v-prediction", action="store_true", help="mark it v-prediction, zero terminal SNR (v_pred, ztsnr)"
    )
    lora = commands.add_parser("dev-lora", help="write a random LoRA that fits a converted model (e.g. the dev model)")
    lora.add_argument("output", type=Path, help="the .safetensors file to write")
    lora.add_argument("--model", type=Path, required=True, help="the converted model folder it must fit")
    lora.add_argument("--kohya", action="store_true", help="Kohya/A1111 key names instead of diffusers' (peft)")
    lora.add_argument(
        "--kind",
        choices=("lora", "loha", "lokr"),
        default="lora",
        help="lora (default), or a LyCORIS loha/lokr file (always Kohya/LyCORIS key names)",
    )
    lora.add_argument("--rank", type=int, default=4)
    lora.add_argument("--seed", type=int, default=0)
    net = commands.add_parser("dev-controlnet", help="write a random SDXL ControlNet sized for the dev model")
    net.add_argument("output", type=Path, help="the .safetensors file to write")
    net.add_argument("--full-size", action="store_true", help="the real SDXL ControlNet architecture (~2.5 GB, fp16)")
    net.add_argument("--diffusers-layout", action="store_true", help="diffusers' tensor names, not control_model.*")
    emb = commands.add_parser("dev-embedding", help="write a random SDXL textual-inversion embedding (clip_l, clip_g)")
    emb.add_argument("output", type=Path, help="the .safetensors file to write (its name is the word prompts use)")
    emb.add_argument("--model", type=Path, help="a converted model whose encoders' widths it takes (default SDXL's)")
    emb.add_argument("--vectors", type=int, default=4, choices=range(1, 76), metavar="1..75")
    emb.add_argument("--seed", type=int, default=0)
    emb.add_argument("--sd15", action="store_true", help="an SD 1.x embedding (emb_params, 768 wide) instead")
    ipa = commands.add_parser("dev-ip-adapter", help="write random SDXL IP-Adapters and image encoders (h94 layout)")
    ipa.add_argument("output", type=Path, help="the IP_ADAPTER_DIR folder to write (sdxl_models/, models/)")
    ipa.add_argument("--full-size", action="store_true", help="SDXL's vit-h and plus vit-h with ViT-H (~2.9 GB, fp16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    drop_unactionable_warnings()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        # Only the converter's own variables (MODEL_BUILD_CACHE): a worker-only one cannot stop a conversion.
        settings = load_settings(command=CONVERT)
        cache_dir = getattr(args, "cache_dir", None) or default_cache_dir(settings.model_build_cache)
        if args.command == "convert":
            from model_build.convert import convert
            from model_build.source import fetch

            source = fetch(args.source, args.sha256, cache_dir)
            if _is_controlnet(source.path, args.vae):
                print(_convert_controlnet(args, source).message)
                return EXIT_OK
            vae = fetch(args.vae, args.vae_sha256, cache_dir) if args.vae else None
            result = convert(
                source.path,
                args.output,
                dtype=args.dtype,
                force=args.force,
                vae=vae.path if vae else None,
                source_name=source.name,
                vae_name=vae.name if vae else None,
                source_sha256=source.sha256,
                vae_sha256=vae.sha256 if vae else None,
                lock_timeout=args.lock_timeout,
                prediction_type=args.prediction_type,
                zero_terminal_snr=args.zero_terminal_snr,
            )
            print(result.message)
        elif args.command == "verify":
            from model_build.manifest import verify

            manifest = verify(args.folder, full=args.full)
            what = "sizes and sha256 of" if args.full else "sizes of"
            print(f"{args.folder}: OK ({what} {len(manifest.files)} files match the manifest)")
        elif args.command == "inspect":
            from model_build.architectures import FAMILIES
            from model_build.checkpoint import inspect_checkpoint
            from model_build.prediction import decide_prediction, describe
            from model_build.source import fetch

            source = fetch(args.source, args.sha256, cache_dir)
            if _is_controlnet(source.path, None):
                from model_build.controlnet import inspect_controlnet

                net = inspect_controlnet(source.path)
                print(
                    f"{source.name}: SDXL ControlNet ({net.layout} layout), config {net.config_name}, "
                    f"{len(net.keys)} tensors, dtypes {', '.join(net.dtypes)}"
                    + (" [dev model: random weights]" if net.is_dev_model else "")
                )
                return EXIT_OK
            info = inspect_checkpoint(source.path)
            counts = ", ".join(f"{component} {len(keys)}" for component, keys in info.component_keys.items())
            print(
                f"{source.name}: {FAMILIES[info.family].description.removeprefix('an ')}, config {info.config_name}, "
                f"{info.num_tensors} tensors "
                f"({counts}; {len(info.ignored)} ignored), dtypes {', '.join(info.dtypes)}"
                + f"; predicts {describe(decide_prediction(info.markers))}"
                + (f" (markers: {', '.join(info.markers)})" if info.markers else "")
                + (" [dev model: random weights]" if info.is_dev_model else "")
            )
        elif args.command == "dev-checkpoint":
            from model_build.dev_model import DEV_MODEL_NOTICE, write_dev_checkpoint

            path = write_dev_checkpoint(
                args.output,
                full_size=args.full_size,
                refiner=args.refiner,
                inpainting=args.inpainting,
                v_prediction=args.v_prediction,
            )
            print(f"wrote {path} ({DEV_MODEL_NOTICE})")
        elif args.command == "dev-lora":
            from model_build.dev_lora import write_dev_lora
            from model_build.dev_lycoris import write_dev_lycoris
            from model_build.manifest import verify

            verify(args.model)  # a clear error for a folder that is not a converted model
            if args.kind == "lora":
                path = write_dev_lora(args.model, args.output, kohya=args.kohya, rank=args.rank, seed=args.seed)
            else:
                path = write_dev_lycoris(args.model, args.output, args.kind, rank=args.rank, seed=args.seed)
            kind = {"lora": "LoRA", "loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr"}[args.kind]
            print(f"wrote {path}: a random {kind} for {args.model} (its images are noise, as the dev model's)")
        elif args.command == "dev-controlnet":
            from model_build.dev_controlnet import write_dev_controlnet

            layout = "diffusers" if args.diffusers_layout else "original"
            path = write_dev_controlnet(args.output, full_size=args.full_size, layout=layout)
            print(f"wrote {path}: a random SDXL ControlNet ({layout} layout; its images are noise, as the dev model's)")
        elif args.command == "dev-embedding":
            from model_build.dev_embedding import model_widths, write_dev_embedding
            from model_build.manifest import verify

            if args.model is not None:
                verify(args.model)  # a clear error for a folder that is not a converted model
            widths = model_widths(args.model) if args.model is not None else None
            path = write_dev_embedding(args.output, widths, vectors=args.vectors, seed=args.seed, sd15=args.sd15)
            kind = "SD 1.x" if args.sd15 else "SDXL"
            fits = f" for {args.model}" if args.model is not None and not args.sd15 else ""
            print(
                f"wrote {path}: a random {kind} embedding of {args.vectors} vectors{fits}; prompts name it {path.stem}"
            )
        elif args.command == "dev-ip-adapter":
            from model_build.dev_ip_adapter import write_dev_ip_adapters

            written = write_dev_ip_adapters(args.output, full_size=args.full_size)
            names = ", ".join(path.stem for path in written)
            print(f"wrote {args.output}: random IP-Adapters {names} and their image encoders (images are noise)")
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIGURATION
    except WorkerError as error:  # a conversion refused, a model folder that is not sound
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as error:  # a file that cannot be read or written: one line, never a traceback
        print(f"error: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _is_controlnet(path: Path, vae: str | None) -> bool:
    from model_build.checkpoint_file import check_file_format
    from model_build.controlnet import is_controlnet_file

    check_file_format(path)  # a pickle is refused before its header is read
    if not is_controlnet_file(path):
        return False
    if vae:
        raise ConfigurationError("--vae applies to SDXL checkpoints; a ControlNet has no VAE (leave --vae out)")
    return True


def _convert_controlnet(args: argparse.Namespace, source):
    from model_build.controlnet import convert_controlnet

    return convert_controlnet(
        source.path,
        args.output,
        dtype=args.dtype,
        force=args.force,
        source_name=source.name,
        source_sha256=source.sha256,
        lock_timeout=args.lock_timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
