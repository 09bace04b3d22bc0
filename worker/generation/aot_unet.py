"""``COMPILE=aot``: the UNet compiled ahead of time by AOTInductor, one package per call shape, kept on disk.

Why: with ``COMPILE=unet`` every start traces the UNet with Dynamo again (16 s on an H200, even with a warm compile
cache), so a compiled worker is minutes from its first image. A package made by ``torch.export`` +
``torch._inductor.aoti_compile_and_package`` is loaded instead: no tracing, no code generation, no compiler.

How it serves:
- During the warm-up, each UNet call of the kind a package can hold (sample, timestep, encoder_hidden_states,
  text_embeds, time_ids; every other argument None) is keyed by its shapes and dtypes, the batch left open: one
  package serves every UNet batch of :data:`BATCH_ROWS` (1-16 images with guidance), so ``WARMUP_BATCH_SIZES=1,4,8``
  is one build, not three, and a batch size nobody warmed still runs compiled code. The package of that key is
  loaded from the cache folder, or built and written there atomically. Each warmed call shape is checked once
  against the eager UNet on that very call (cosine of the outputs at least :data:`AGREEMENT`), so a stale or wrong
  file never serves. A UNet whose export cannot leave the batch open (or a batch outside the range, such as one
  image without guidance) gets a package for its exact shapes instead; a ``.batch-closed.txt`` marker beside the
  open package's name, with export's reason, spares later starts the failed export.
- Packages hold no weights (``package_constants_in_so`` off): the live UNet's tensors are handed over as
  user-managed constants, so the compiled code reads the weights the model holds now. LoRAs merged in place
  (``LORA_FUSE=1``, :mod:`worker.adapters.lora.fusion`) therefore change its output, as they do compiled code.
- After the warm-up nothing is built: a call runs its package when its key has one and the UNet still has the
  modules, attention processors and weight tensors it was exported with; any other call runs the original eager
  forward. That covers other sizes, ControlNet residuals, IP-Adapter image embeddings, peft LoRA layers
  (``LORA_FUSE=0``, DoRA), LCM's ``timestep_cond`` and modules replaced by FP8.
- Noticing a structure change costs nothing per step: torch's global module and parameter registration hooks
  flag any change under the UNet (peft, IP-Adapter and FP8 install modules by attribute assignment), and only then
  is the structure compared again. While it differs, it is compared at the start of each denoising loop (7 ms
  for the full-size UNet on this project's CPU: too much for every step), so a structure put back without a hook
  (IP-Adapter's plain processors) serves compiled code again from the next job on.
  A plain-object attention processor swapped in with no module change is not noticed: nothing in this worker does
  that after the warm-up.

CUDA graphs (``COMPILE_MODE=reduce-overhead``, as for ``COMPILE=unet``): AOTInductor launches each of the UNet's
~1,700 kernels from its C++ wrapper, and on the H200 the GPU was busy 29.4 ms of a 34.9 ms step (bench/results,
``unet_kernels``). With graphs on, each package's call is captured once into a CUDA graph after its agreement check,
reading its inputs from static buffers, and a call copies its inputs in and replays it. The same package serves
both modes (graphs are not compiled into it). Such packages are loaded with AOTInductor's single-threaded runner,
whose run records no CUDA events (the default runner's event query is illegal during capture); the engine makes
one UNet call at a time. A capture that fails is logged and reported, and the package then runs without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch._inductor

from core.errors import ConfigurationError
from core.url_download import download_lock
from worker.generation.compile_cache import device_identity

log = logging.getLogger(__name__)

PACKAGE_FORMAT = 2  # 2: the batch dimension left open (BATCH_ROWS)
# UNet batch rows one package serves: 1-16 images with guidance (the request's limit is 8, the batch runner's
# --batch-size 4-8 on a large GPU), 2-32 without. Not 1: export specialises a size-1 dimension.
BATCH_ROWS = (2, 32)
# A package's first output against the eager UNet's on the same inputs: compiled kernels reorder sums (fp16/bf16
# differ in the last bits, ~0.99999); a package fed the wrong weights or built for another graph is far below.
AGREEMENT = 0.999
_PACKAGED_KWARGS = ("encoder_hidden_states", "added_cond_kwargs", "return_dict")
_ADDED_CONDITIONS = ("text_embeds", "time_ids")
_RUNNER_FAILED = "API call failed at"  # AOTInductor's runner: run_func_(...) API call failed at ...cpp, line N
_INSTALLED: weakref.WeakValueDictionary[int, AotUNet] = weakref.WeakValueDictionary()


def call_counts(what: str = "UNet") -> dict[str, int] | None:
    """Calls served by packages and eagerly, summed over this process's AOT modules of one kind (``what``: "UNet"
    or "VAE decoder"; the smoke prints them); None where none of that kind is installed."""
    installed = [aot for aot in _INSTALLED.values() if aot.what == what]
    if not installed:
        return None
    return {
        "packaged": sum(aot.packaged_calls for aot in installed),
        "eager": sum(aot.eager_calls for aot in installed),
    }


@dataclass
class PackageRecord:
    """One package of the warm-up, for its report."""

    key: str
    file: str | None
    inputs: list[list[Any]]  # the warmed call's shapes and dtypes
    hit: bool  # the package was loaded (from disk, or for an earlier warmed shape), not built
    seconds: float
    agreement: float | None = None
    cuda_graph: str | None = None  # "captured", "off", or why it was not
    batch_rows: list[int] | None = None  # the UNet batches the package serves; None: only this call's shapes

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Graphed:
    """A package's call captured in a CUDA graph: inputs are copied into ``inputs``, the result is read from
    ``output`` (copied out at once: the next replay, or another graph sharing the pool, overwrites it)."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()


@dataclass
class _Loaded:
    model: Any  # torch._inductor's AOTICompiledModel
    constant_names: list[str]
    digest: str
    file: str | None
    batch_rows: tuple[int, int] | None
    checked: set[tuple] = field(default_factory=set)  # exact call shapes checked against the eager UNet
    graphs: dict[tuple, _Graphed] = field(default_factory=dict)  # per exact call shape, when graphs are on

    def run(self, shapes: tuple, inputs: tuple) -> torch.Tensor:
        graphed = self.graphs.get(shapes)
        if graphed is not None:
            return graphed(*inputs)
        return _first(self.model(*inputs))


class _ExportedCall(torch.nn.Module):
    """The UNet call a package holds, with flat tensor inputs (what ``torch.export`` needs)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet  # its weights are the package's constants "unet.*"

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        # The class's forward, not the instance attribute: that is the dispatcher below.
        return type(self.unet).forward(
            self.unet,
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]


@dataclass
class AotUNet:
    """``unet.forward`` replacement: packaged code for the warmed call shapes, the eager forward for the rest."""

    module: Any  # the UNet (or, in the subclass below, the VAE decoder)
    eager_forward: Any
    cache_dir: Path | None
    options_digest: str
    inductor_configs: dict[str, Any]
    cuda_graphs: bool = False  # COMPILE_MODE=reduce-overhead: each CUDA package's call replayed from a graph
    packages: dict[tuple, _Loaded] = field(default_factory=dict)
    records: list[PackageRecord] = field(default_factory=list)
    building: bool = True  # the warm-up: a missing package is built; afterwards it is not
    disabled: bool = False  # the warm-up failed: eager only
    packaged_calls: int = 0
    eager_calls: int = 0
    _structure: tuple = ()
    _structure_matches: bool = True
    _changed: bool = False
    _last_step: tuple | None = None  # where the previous call's timestep sat (see _new_denoising_loop)
    _calls_unchecked: int = 0
    _watched: set[int] = field(default_factory=set)
    _hooks: list[Any] = field(default_factory=list)
    _closed: set[tuple] = field(default_factory=set)  # open-batch keys whose export failed: exact shapes instead

    what: ClassVar[str] = "UNet"
    file_prefix: ClassVar[str] = "sdxl-unet"
    open_rows: ClassVar[tuple[int, int]] = BATCH_ROWS
    constant_prefix: ClassVar[str] = "unet."  # the attribute of _ExportedCall that holds the module
    own_inductor_configs: ClassVar[dict[str, Any]] = {}  # the module's own, over those every package gets

    @classmethod
    def install(
        cls,
        module: Any,
        cache_dir: Path | None,
        options_digest: str,
        inductor_configs: dict[str, Any],
        cuda_graphs: bool = False,
    ) -> AotUNet:
        """Replace ``module.forward`` (after every other change to it: layout, fused projections)."""
        configs = {**inductor_configs, **cls.own_inductor_configs}
        aot = cls(module, module.forward, cache_dir, options_digest, configs, cuda_graphs)
        aot._structure = aot._fingerprint()
        aot._watched = {id(child) for child in module.modules()}
        registration = torch.nn.modules.module
        aot._hooks = [
            registration.register_module_module_registration_hook(aot._on_registration),
            registration.register_module_parameter_registration_hook(aot._on_registration),
            registration.register_module_buffer_registration_hook(aot._on_registration),
        ]
        module.forward = aot
        _INSTALLED[id(aot)] = aot
        return aot

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.module.forward = self.eager_forward

    def freeze(self) -> None:
        self.building = False

    def disable(self) -> None:
        self.building = False
        self.disabled = True

    # -- serving ---------------------------------------------------------------------------------------------------

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        inputs = None if self.disabled else self._packaged_inputs(sample, timestep, args, kwargs)
        if inputs is None or not self._unchanged(self._new_denoising_loop(timestep)):
            self.eager_calls += 1
            return self.eager_forward(sample, timestep, *args, **kwargs)
        output = self._serve(inputs)
        if output is None:
            self.eager_calls += 1
            return self.eager_forward(sample, timestep, *args, **kwargs)
        self.packaged_calls += 1
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=output)
        return (output,)

    def _serve(self, inputs: tuple) -> torch.Tensor | None:
        """The packaged call's output for these flat inputs; None when this call must run eagerly."""
        shapes = _key(inputs)
        loaded = self._lookup(shapes, inputs)
        if loaded is None or (shapes not in loaded.checked and self.building):
            if not self.building:
                return None
            started = time.perf_counter()
            hit = loaded is not None
            if loaded is None:
                key = _package_key(inputs, self.open_rows)
                key = shapes if key in self._closed else key
                loaded, hit = self._load_or_build(key, inputs)  # raises on failure: the warm-up then serves eagerly
            self._check(loaded, shapes, inputs, hit, started)
        try:
            return loaded.run(shapes, inputs)
        except RuntimeError as error:
            if _RUNNER_FAILED not in str(error):
                raise
            # AOTInductor's runner turns any failure inside the package, CUDA's out of memory among them, into
            # this one message (the cause goes to stderr: bench/results, the smoke's out_of_memory line). The eager
            # module on the same call tells them apart: it raises torch's OutOfMemoryError when memory is short
            # (the handler then asks RunPod for a fresh worker), or computes what the package could not.
            log.warning("AOT package %s failed (batch %d); this call runs eagerly", loaded.digest, len(inputs[0]))
            return None

    def package_for(self, inputs: tuple) -> _Loaded | None:
        """The package loaded for these flat inputs (open batch or exact shapes), if any."""
        return self._lookup(_key(inputs), inputs)

    def _lookup(self, shapes: tuple, inputs: tuple) -> _Loaded | None:
        return self.packages.get(shapes) or self.packages.get(_package_key(inputs, self.open_rows))

    def _packaged_inputs(self, sample: Any, timestep: Any, args: tuple, kwargs: dict) -> tuple | None:
        """The flat inputs of a call a package can hold, or None (it runs eagerly)."""
        if args:
            if len(args) > 1 or "encoder_hidden_states" in kwargs:
                return None
            kwargs = {**kwargs, "encoder_hidden_states": args[0]}
        for name, value in kwargs.items():
            if name in _PACKAGED_KWARGS or value is None or (isinstance(value, dict) and not value):
                continue
            return None  # timestep_cond, cross_attention_kwargs, ControlNet residuals, masks...
        hidden = kwargs.get("encoder_hidden_states")
        added = kwargs.get("added_cond_kwargs") or {}
        if not torch.is_tensor(hidden) or not torch.is_tensor(sample) or set(added) != set(_ADDED_CONDITIONS):
            return None  # IP-Adapter's image_embeds, tuples of hidden states, class labels...
        if not all(torch.is_tensor(added[name]) for name in _ADDED_CONDITIONS):
            return None
        if torch.is_tensor(timestep):
            # exact for SDXL's integer timesteps below 1000; a copy because the scheduler's timestep is an element
            # of its timesteps tensor, not 16-byte aligned, which the package would copy with a warning per step
            timestep = timestep.to(torch.float32, copy=True)
        else:
            timestep = torch.tensor(float(timestep), dtype=torch.float32, device=sample.device)
        tensors = (sample, timestep, hidden, added["text_embeds"], added["time_ids"])
        return tuple(tensor.contiguous() for tensor in tensors)

    def _on_registration(self, module: Any, name: str, value: Any) -> None:
        if id(module) in self._watched:
            self._changed = True

    def _new_denoising_loop(self, timestep: Any) -> bool:
        """Whether this call starts a new denoising loop, told without reading the timestep's value (a GPU sync):
        a loop's timesteps are successive elements of one ``scheduler.timesteps`` tensor, so a call whose timestep
        lies in another tensor, or not after the previous one's, begins another loop."""
        if torch.is_tensor(timestep):
            where = (timestep.untyped_storage().data_ptr(), timestep.data_ptr())
        else:
            where = (0, -float(timestep))  # a plain number: timesteps fall within a loop
        new = self._last_step is None or where[0] != self._last_step[0] or where[1] <= self._last_step[1]
        self._last_step = where
        return new

    def _unchanged(self, new_loop: bool) -> bool:
        """Whether the UNet still has the structure the packages were exported with (see the module doc).

        Compared again after any registration under the UNet, and, while it differs, at the start of each denoising
        loop (or every 50 calls): a structure put back by plain attribute assignment (IP-Adapter's processors) fires
        no hook, and comparing on every step would cost an eager step several milliseconds."""
        self._calls_unchecked += 1
        stale = not self._structure_matches and (new_loop or self._calls_unchecked >= 50)
        if self._changed or stale:
            self._changed = False
            self._calls_unchecked = 0
            self._structure_matches = self._fingerprint() == self._structure
            if self._structure_matches:
                self._watched = {id(child) for child in self.module.modules()}
        return self._structure_matches

    def _fingerprint(self) -> tuple:
        modules = tuple(
            (name, id(module), id(getattr(module, "processor", None))) for name, module in self.module.named_modules()
        )
        tensors = tuple((name, tensor.data_ptr()) for name, tensor in _constants(self.module).items())
        return modules, tensors

    # -- packages --------------------------------------------------------------------------------------------------

    def _load_or_build(self, key: tuple, inputs: tuple) -> tuple[_Loaded, bool]:
        """The package of ``key``, loaded or built, its weights handed over; and whether it was loaded."""
        digest = self._digest(key)
        path = None if self.cache_dir is None else self.cache_dir / f"{self.file_prefix}-{digest}.pt2"
        batch_rows = self.open_rows if _is_open(key) else None
        closed = None if path is None else path.with_name(path.stem + ".batch-closed.txt")
        if closed is not None and closed.is_file():  # an earlier start found the batch cannot stay open
            return self._exact(key, inputs)
        try:
            if path is None:
                model, hit = self._build(inputs, None, batch_rows), False
            else:
                # Workers starting together on one volume: one builds, the others wait and load what it wrote.
                lock = path.with_name(path.name + ".lock")
                with download_lock(lock, f"building the AOT package {path.name}", logger=log):
                    model = self._load(path, inputs)
                    hit = model is not None
                    if model is None:
                        model = self._build(inputs, path, batch_rows)
        except _BatchStaysClosed as refusal:  # a package for these exact shapes instead
            if closed is not None:  # so that the next start does not export in vain (tens of seconds) first
                closed.write_text(f"{refusal}\n")
            return self._exact(key, inputs)
        loaded = _Loaded(model, list(model.get_constant_fqns()), digest, str(path) if path else None, batch_rows)
        self._hand_over_weights(loaded)
        self.packages[key] = loaded
        return loaded, hit

    def _exact(self, key: tuple, inputs: tuple) -> tuple[_Loaded, bool]:
        self._closed.add(key)
        return self._load_or_build(_key(inputs), inputs)

    def _check(self, loaded: _Loaded, shapes: tuple, inputs: tuple, hit: bool, started: float) -> None:
        """A warmed call shape: the package against the eager module on this call, then its graph; a record."""
        agreement = self._agreement(loaded, inputs)
        cuda_graph = self._capture(loaded, shapes, inputs) if agreement >= AGREEMENT else None  # wrong: never serves
        record = PackageRecord(
            loaded.digest,
            loaded.file,
            [[list(tensor.shape), str(tensor.dtype)] for tensor in inputs],
            hit,
            round(time.perf_counter() - started, 3),
            agreement,
            cuda_graph,
            list(loaded.batch_rows) if loaded.batch_rows else None,
        )
        self.records.append(record)
        if agreement < AGREEMENT:
            for key, value in list(self.packages.items()):
                if value is loaded:
                    del self.packages[key]
            raise RuntimeError(
                f"AOT package {loaded.file or loaded.digest} disagrees with the eager {self.what} "
                f"(cosine {agreement:.5f} < {AGREEMENT}); delete it to rebuild, or set COMPILE=off"
            )
        loaded.checked.add(shapes)
        log.info(
            "AOT package %s (%s): %s in %.1f s for batch %d (serves batches %s; CUDA graph: %s)",
            loaded.digest,
            self.what,
            "loaded" if hit else "built",
            record.seconds,
            inputs[0].shape[0],
            "-".join(map(str, loaded.batch_rows)) if loaded.batch_rows else inputs[0].shape[0],
            record.cuda_graph,
        )

    def _capture(self, loaded: _Loaded, shapes: tuple, inputs: tuple) -> str:
        """Capture ``loaded``'s call at ``shapes`` in a CUDA graph when graphs are on; what happened, for the record."""
        if not self.cuda_graphs:
            return "off"
        if inputs[0].device.type != "cuda":
            return f"not on {inputs[0].device.type}"
        try:
            loaded.graphs[shapes] = _capture_graph(loaded.model, inputs)
        except Exception as error:  # a torch whose package runtime cannot be captured: serve it without the graph
            log.warning("AOT package: CUDA graph capture failed (%s: %s); runs without", type(error).__name__, error)
            return f"failed: {type(error).__name__}: {error}"[:300]
        return "captured"

    def _load(self, path: Path, inputs: tuple) -> Any | None:
        """The package at ``path``, or None when there is none or it does not load (then it is built again)."""
        if not path.is_file():
            return None
        device_index = _device_index(inputs[0])
        try:
            with _cpu_isa_as_recorded(path) if device_index >= 0 else contextlib.nullcontext():
                return self._open(str(path), device_index)
        except Exception as error:  # a truncated file or another build's: build afresh and replace it
            log.warning("AOT package %s not loadable (%s: %s); building it again", path, type(error).__name__, error)
            return None

    def _build(self, inputs: tuple, path: Path | None, batch_rows: tuple[int, int] | None) -> Any:
        """The package built (and written to ``path``); raises _BatchStaysClosed when the batch cannot stay open."""
        from worker.generation.compile_prerequisites import aot_build_missing

        missing = aot_build_missing(inputs[0].device.type == "cuda")
        if missing:
            shapes = ", ".join("x".join(map(str, t.shape)) or "scalar" for t in inputs)
            where = path.parent if path else "no cache folder"
            raise ConfigurationError(
                f"COMPILE=aot has no package for the {self.what} call ({shapes}) in {where}"
                f" and cannot build one here: {'; '.join(missing)} missing. Build the packages once with the "
                "same torch and GPU where a C++ compiler is installed, into COMPILE_CACHE_DIR (the network volume by "
                "default), or set COMPILE=off"
            )
        from torch._dynamo.exc import UserError

        dynamic, example = None, inputs
        if batch_rows is not None:
            rows = torch.export.Dim("rows", min=batch_rows[0], max=batch_rows[1])
            dynamic = tuple({0: rows} if tensor.dim() else None for tensor in inputs)
            if inputs[0].shape[0] == 1:  # export specialises a size-1 dimension: trace two rows, serve one too
                example = tuple(torch.cat([tensor, tensor]) if tensor.dim() else tensor for tensor in inputs)
        try:
            exported = torch.export.export(self._exported(), example, dynamic_shapes=dynamic, strict=False)
        except UserError as error:  # the module's code fixes its batch size somewhere
            if dynamic is None:
                raise
            log.warning("AOT package: the %s's batch cannot stay open (%s); packaging these shapes", self.what, error)
            raise _BatchStaysClosed(f"torch.export could not leave the {self.what}'s batch open: {error}") from error
        configs = {**self.inductor_configs, "aot_inductor.package_constants_in_so": False}
        if path is None:  # no cache folder: built for this process only
            with tempfile.TemporaryDirectory(prefix="aot-") as folder:
                built = torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(Path(folder) / "package.pt2"), inductor_configs=configs
                )
                return self._open(built, _device_index(inputs[0]))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside its final name and renamed: a worker starting beside this one never loads half a file.
        handle, temporary = tempfile.mkstemp(prefix=path.stem + ".", suffix=".partial.pt2", dir=path.parent)
        os.close(handle)
        try:
            built = torch._inductor.aoti_compile_and_package(exported, package_path=temporary, inductor_configs=configs)
            model = self._open(built, _device_index(inputs[0]))
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from workers running as another user
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
        return model

    def _open(self, path: str, device_index: int) -> Any:
        # The single-threaded runner for graphs: the default one records and queries a CUDA event per run.
        single = self.cuda_graphs and device_index >= 0
        return torch._inductor.aoti_load_package(path, run_single_threaded=single, device_index=device_index)

    def _hand_over_weights(self, loaded: _Loaded) -> None:
        constants = {f"{self.constant_prefix}{name}": tensor for name, tensor in _constants(self.module).items()}
        missing = [name for name in loaded.constant_names if name not in constants]
        if missing:
            raise RuntimeError(f"AOT package needs constants the {self.what} does not have: {', '.join(missing[:5])}")
        loaded.model.load_constants(
            {name: constants[name] for name in loaded.constant_names}, check_full_update=True, user_managed=True
        )

    def _agreement(self, loaded: _Loaded, inputs: tuple) -> float:
        packaged = _first(loaded.model(*inputs))
        with torch.no_grad():
            eager = self._exported()(*inputs)
        cosine = torch.nn.functional.cosine_similarity(packaged.float().flatten(), eager.float().flatten(), dim=0)
        return float(cosine) if torch.isfinite(cosine) else 0.0

    def _exported(self) -> torch.nn.Module:
        """The module's call with flat inputs, as exported (its class's forward, not the dispatcher)."""
        return _ExportedCall(self.module)

    def _digest(self, key: tuple) -> str:
        parts = {
            "format": PACKAGE_FORMAT,
            **device_identity(torch.device(key[0][2])),  # the sample's device
            "options": self.options_digest,
            "inductor": self.inductor_configs,
            "inputs": [list(map(str, item)) for item in key],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class _ExportedDecoder(torch.nn.Module):
    """The VAE decoder's call a package holds: latents in, image out."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder  # its weights are the package's constants "decoder.*"

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return type(self.decoder).forward(self.decoder, sample)


@dataclass
class AotVaeDecoder(AotUNet):
    """``vae.decoder.forward`` replacement under ``COMPILE=aot`` with ``COMPILE_VAE=1``: the decoder packaged like
    the UNet (same cache folder, lock, check against eager, CUDA graphs, weights handed over), so a compiled VAE
    starts without Dynamo's tracing too (6-8 s per batch size with its cache, bench/results).

    One package serves batches 1-16: the decoder's export has no guard on its batch. Its structure (modules and
    weight tensors) is compared on every call: a decode is one call per job or tile, the comparison well under a
    millisecond for its ~250 tensors, and a VAE moved to another dtype and back (diffusers' upcast) gets new weight
    tensors that no registration hook reports; such a call runs eagerly.
    """

    what: ClassVar[str] = "VAE decoder"
    file_prefix: ClassVar[str] = "sdxl-vae-decoder"
    open_rows: ClassVar[tuple[int, int]] = (1, 16)
    constant_prefix: ClassVar[str] = "decoder."
    # Inductor lays convolutions out in NHWC by a heuristic that skips any graph whose convolutions have a symbolic
    # size (pytorch#102670), and the open batch is one: the decoder's convolutions then ran NCHW (H200, bf16, 1024²:
    # 59 ms a decode packaged, 35 ms compiled by Dynamo at fixed shapes). The UNet's weights are channels_last
    # themselves, so its package needs no such push.
    own_inductor_configs: ClassVar[dict[str, Any]] = {"force_layout_optimization": True}

    def __call__(self, sample: torch.Tensor, latent_embeds: Any = None) -> torch.Tensor:
        servable = not self.disabled and latent_embeds is None and torch.is_tensor(sample)
        output = self._serve((sample.contiguous(),)) if servable and self._fingerprint() == self._structure else None
        if output is None:
            self.eager_calls += 1
            return self.eager_forward(sample, latent_embeds)
        self.packaged_calls += 1
        return output

    def _exported(self) -> torch.nn.Module:
        return _ExportedDecoder(self.module)


@contextlib.contextmanager
def _cpu_isa_as_recorded(path: Path) -> Iterator[None]:
    """Load a CUDA package without probing the CPU's vector instructions.

    torch's loader compares the package's recorded CPU ISA with this machine's only to log a warning, and learns
    this machine's by compiling and loading six C++ probes; torch 2.11 loads each in a child Python that imports
    torch. On the H200 machine that took 35-45 s of a 46 s package load (bench/results, cProfile). A CUDA package's
    kernels run on the GPU, so for its load the ISA is taken as recorded. Where this torch has no such hook the
    load simply probes.
    """
    try:
        isa_module = importlib.import_module("torch._inductor.cpu_vec_isa")  # patched before the loader looks it up
    except ImportError:
        isa_module = None
    loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    read_metadata = getattr(loader, "load_metadata_from_package", None)
    recorded = None
    if isa_module is not None and hasattr(isa_module, "pick_vec_isa") and read_metadata is not None:
        with contextlib.suppress(Exception):  # unreadable here: the load itself reports a broken file
            recorded = read_metadata(str(path), "model").get("AOTI_CPU_ISA")
    if recorded is None:
        yield
        return
    original = isa_module.pick_vec_isa

    def as_recorded() -> _RecordedIsa:
        return _RecordedIsa(recorded)

    isa_module.pick_vec_isa = as_recorded
    try:
        yield
    finally:
        isa_module.pick_vec_isa = original
        _unbind(as_recorded, original)


def _unbind(patched: Any, original: Any) -> None:
    """Put ``original`` back in every torch module that bound ``patched`` by name while it was in place.

    torch._inductor.codecache and codegen.cpp_micro_gemm import ``pick_vec_isa`` by name; first imported during a
    package's load, they kept the stand-in, and a later build's C++ step failed on it (H200, a VAE decoder package
    built after the UNet's was loaded: "'_RecordedIsa' object has no attribute 'build_macro'")."""
    for name, module in list(sys.modules.items()):
        if name.startswith("torch.") and getattr(module, "__dict__", {}).get("pick_vec_isa") is patched:
            module.pick_vec_isa = original


class _BatchStaysClosed(Exception):
    """torch.export could not leave the module's batch open (its code fixes it somewhere)."""


@dataclass(frozen=True)
class _RecordedIsa:
    name: str

    def __str__(self) -> str:
        return self.name


_GRAPH_POOLS: dict[int, Any] = {}  # per GPU: one memory pool for every captured package call


def _capture_graph(model: Any, inputs: tuple) -> _Graphed:
    """``model``'s call on copies of ``inputs`` captured in a CUDA graph (after one run on the capture's side
    stream, as torch's docs ask). All graphs of a GPU share one pool: the engine runs one call at a time and copies
    each output out before the next replay."""
    device = inputs[0].device
    static = tuple(torch.empty_like(tensor).copy_(tensor) for tensor in inputs)  # empty_like keeps the strides
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(side):
        _first(model(*static))
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    pool = _GRAPH_POOLS.setdefault(device.index or 0, torch.cuda.graph_pool_handle())
    with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
        output = _first(model(*static))
    return _Graphed(graph, static, output)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (list, tuple)) else output


def _key(inputs: tuple) -> tuple:
    return tuple((tuple(tensor.shape), str(tensor.dtype), str(tensor.device)) for tensor in inputs)


def _package_key(inputs: tuple, rows: tuple[int, int]) -> tuple:
    """The key of the package serving this call: its shapes with the batch left open when it is within ``rows``."""
    if not rows[0] <= inputs[0].shape[0] <= rows[1]:
        return _key(inputs)
    open_batch = "rows {}-{}".format(*rows)
    return tuple(
        ((open_batch, *tensor.shape[1:]) if tensor.dim() else (), str(tensor.dtype), str(tensor.device))
        for tensor in inputs
    )


def _is_open(key: tuple) -> bool:
    first = key[0][0][:1]
    return bool(first) and isinstance(first[0], str)


def _constants(unet: Any) -> dict[str, torch.Tensor]:
    return {**dict(unet.named_parameters()), **dict(unet.named_buffers())}


def _device_index(tensor: torch.Tensor) -> int:
    return -1 if tensor.device.type != "cuda" else (tensor.device.index or 0)
