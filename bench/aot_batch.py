"""One open-batch AOT package against exact-shape ones, call by call, as JSON lines (``COMPILE=aot``, a GPU).

    python bench/aot_batch.py --model-dir M --cache-dir C [--exact sdxl-unet-OLD.pt2] [--batch-sizes 1 4 8]

Loads the engine (``COMPILE=aot COMPILE_MODE=reduce-overhead``, ``WARMUP_BATCH_SIZES`` = the batch sizes), so its
warm-up loads (or builds) the one package that serves every batch and captures a CUDA graph per warmed batch. Then,
in this process, for each batch: the package's call plain and replayed from its graph (ms), the eager UNet's, and
their agreement. ``--exact``: a package built for one exact call shape (what ``PACKAGE_FORMAT`` 1 built, batch 1
with guidance), loaded into the same UNet and timed on the same inputs, so the open batch's cost is a same-process
ratio. What is not a GPU figure: on the CPU graphs are not captured and the numbers say little.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_speed import cosine, milliseconds, timed, unet_inputs
from bench.jsonlines import emit, start


def call_ms(function: object, inputs: tuple, repeats: int) -> dict[str, float]:
    """Median and best milliseconds of ``function(*inputs)``, two calls of warm-up first."""
    return milliseconds(timed(lambda: function(*inputs), repeats, warmup=2))


def flat_inputs(aot: object, unet: torch.nn.Module, size: int, batch: int) -> tuple:
    parameter = next(unet.parameters())
    kwargs = unet_inputs(unet, size, batch, parameter.device.type, parameter.dtype)
    sample, timestep = kwargs.pop("sample"), kwargs.pop("timestep")
    return aot._packaged_inputs(sample, timestep, (), kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True, help="COMPILE_CACHE_DIR (packages in its aot/)")
    parser.add_argument("--exact", type=Path, help="an exact-shape package (batch 1 with guidance) to compare")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="images per call")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    start(args.out)

    from core.settings import load_settings
    from worker.generation.aot_unet import _capture_graph, _first, _key, _Loaded
    from worker.generation.engine import Engine

    settings = {
        "COMPILE": "aot",
        "COMPILE_MODE": "reduce-overhead",
        "COMPILE_CACHE_DIR": str(args.cache_dir),
        "WARMUP_SIZES": f"{args.size}x{args.size}",
        "WARMUP_BATCH_SIZES": ",".join(map(str, args.batch_sizes)),
    }
    engine = Engine(args.model_dir, settings=load_settings(settings))
    report = engine.accelerator.report
    emit(bench="aot_batch_start", error=report.error, warm_up_s=round(report.seconds, 2), packages=report.aot_packages)
    aot = engine.accelerator.aot
    unet = engine.pipe.unet
    for batch in args.batch_sizes:
        inputs = flat_inputs(aot, unet, args.size, batch)
        loaded = aot.package_for(inputs)
        if loaded is None:
            emit(bench="aot_batch", batch=batch, skipped="no package serves this call")
            continue
        graph = loaded.graphs.get(_key(inputs))

        eager_call = aot._exported()  # the UNet's own forward on the flat inputs, as the package's check runs it

        with torch.no_grad():
            eager = eager_call(*inputs)
            plain = _first(loaded.model(*inputs))
            line = {
                "bench": "aot_batch",
                "batch": batch,
                "unet_rows": inputs[0].shape[0],
                "batch_rows": loaded.batch_rows,
                "package": loaded.digest,
                "cosine_vs_eager": cosine(plain.float().cpu(), eager.float().cpu()),
                "plain_ms": call_ms(loaded.model, inputs, args.repeats),
                "eager_ms": call_ms(eager_call, inputs, max(3, args.repeats // 4)),
            }
            if graph is not None:
                line["graph_ms"] = call_ms(graph, inputs, args.repeats)
                line["graph_bit_identical_to_plain"] = bool(torch.equal(graph(*inputs), plain))
            if args.exact and batch == 1:
                try:
                    model = aot._open(str(args.exact), inputs[0].device.index or 0)
                    exact = _Loaded(model, list(model.get_constant_fqns()), "exact", str(args.exact), None)
                    aot._hand_over_weights(exact)
                    exact_graph = _capture_graph(exact.model, inputs)
                    exact_out = _first(exact.model(*inputs))
                    line["exact"] = {
                        "file": args.exact.name,
                        "cosine_vs_eager": cosine(exact_out.float().cpu(), eager.float().cpu()),
                        "plain_ms": call_ms(exact.model, inputs, args.repeats),
                        "graph_ms": call_ms(exact_graph, inputs, args.repeats),
                    }
                    # the open package again, after the exact one: the order of the two must not decide
                    if graph is not None:
                        line["graph_ms_again"] = call_ms(graph, inputs, args.repeats)
                except Exception as error:  # a finding, not the end of the run
                    line["exact"] = {"error": f"{type(error).__name__}: {error}"[:400]}
        emit(**line)


if __name__ == "__main__":
    main()
