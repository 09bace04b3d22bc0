"""A1111 prompt editing on the dev model: per-step conditioning equals encoding each segment's plain text, for both
encoders and the pooled vector, and the pipeline's denoising loop sees exactly that conditioning at each step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import InvalidRequest
from tests.support.dev_pipes import load_dev_pipe, one_torch_thread
from worker.prompting.encoded import EncodedPrompts
from worker.prompting.encoding import PromptEncoder
from worker.prompting.stepping import conditioning_callback

STEPS = 4


one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def pipe(dev_model_dir: Path):
    return load_dev_pipe(dev_model_dir)


@pytest.fixture(scope="module")
def encoder(pipe) -> PromptEncoder:
    return PromptEncoder(pipe)


def assert_same(ours: EncodedPrompts, reference: EncodedPrompts) -> None:
    for mine, theirs in zip(ours.tensors(), reference.tensors(), strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert torch.equal(mine, theirs)


def test_without_editing_syntax_steps_change_nothing(encoder) -> None:
    for prompt in ("a cat on a mat", "a (cat:1.3) [on] a mat BREAK x", "[a] [b c]", "a [b] c: 2"):
        plain = encoder.encode(prompt, negative_prompt="blurry")
        with_steps = encoder.encode(prompt, negative_prompt="blurry", steps=STEPS)
        assert not with_steps.is_scheduled and "schedule" not in with_steps.info
        assert_same(with_steps, plain)


def test_each_step_gets_its_segments_plain_encoding(encoder) -> None:
    encoded = encoder.encode("a photo of a [cat:dog:0.5] on a mat", negative_prompt="[blurry::2]", steps=STEPS)
    assert encoded.is_scheduled
    # A1111: [cat:dog:0.5] at 4 steps ends at step 2, [blurry::2] too; steps 0..2 read the first texts.
    expected = {
        0: ("a photo of a cat on a mat", "blurry"),
        1: ("a photo of a cat on a mat", "blurry"),
        2: ("a photo of a cat on a mat", "blurry"),
        3: ("a photo of a dog on a mat", ""),
    }
    for step, (prompt, negative) in expected.items():
        assert_same(encoded.at_step(step), encoder.encode(prompt, negative_prompt=negative))
    assert_same(encoded, encoded.at_step(0))  # the result's own tensors are step 0's
    # Both encoders and the pooled vector change, the negative too.
    first, last = encoded.at_step(0), encoded.at_step(3)
    for before, after in zip(first.tensors(), last.tensors(), strict=True):
        assert not torch.equal(before, after)
    assert encoded.info["schedule"] == {
        "texts": [
            {"prompt": "a photo of a cat on a mat", "negative_prompt": "blurry"},
            {"prompt": "a photo of a dog on a mat", "negative_prompt": ""},
        ],
        "segments": [{"steps": [0, 2], "texts": 0}, {"steps": [3, 4], "texts": 1}],
    }
    json.dumps(encoded.info)


def test_alternation_switches_every_step(encoder) -> None:
    encoded = encoder.encode("a [cat|dog] on a mat", steps=6, do_classifier_free_guidance=False)
    cat = encoder.encode("a cat on a mat", do_classifier_free_guidance=False)
    dog = encoder.encode("a dog on a mat", do_classifier_free_guidance=False)
    # A1111's lookup: step 0 and 1 read segment 1 ("cat"), then it alternates.
    for step, expected in enumerate([cat, cat, dog, cat, dog, cat]):
        assert_same(encoded.at_step(step), expected)
    assert len(encoded.info["schedule"]["texts"]) == 2  # each distinct text encoded once
    assert encoded.at_step(2) is encoded.at_step(4)


def test_segments_of_different_lengths_are_padded_to_the_longest(pipe, encoder) -> None:
    long_text = " ".join(["cat"] * 100)  # two chunks
    encoded = encoder.encode(f"[{long_text}:a dog:2]", negative_prompt="blurry", steps=STEPS)
    assert encoded.num_chunks == 2
    short = encoded.at_step(3)
    assert short.prompt_embeds.shape == encoded.prompt_embeds.shape == short.negative_prompt_embeds.shape
    # The short segment is its own encoding followed by a whole padding chunk (the empty prompt's chunk).
    alone = encoder.encode("a dog", negative_prompt="blurry")
    empty = encoder.encode("", negative_prompt="blurry")
    torch.testing.assert_close(short.prompt_embeds[:, :77], alone.prompt_embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(short.prompt_embeds[:, 77:], empty.prompt_embeds, rtol=1e-6, atol=1e-6)
    assert torch.equal(short.pooled_prompt_embeds, alone.pooled_prompt_embeds) or torch.allclose(
        short.pooled_prompt_embeds, alone.pooled_prompt_embeds, rtol=1e-6, atol=1e-6
    )
    assert_same(encoded.at_step(0), encoder.encode(long_text, negative_prompt="blurry"))


def test_editing_is_cached_per_distinct_text(pipe) -> None:
    encoder = PromptEncoder(pipe)
    first = encoder.encode("a [cat:dog:2]", steps=STEPS)
    assert first.info["cache_hit"] is False
    again = encoder.encode("a [cat:dog:2]", steps=STEPS)
    assert again.info["cache_hit"] is True
    assert encoder.encode("a dog").info["cache_hit"]  # a segment is the plain text's own cache entry
    again.at_step(3).prompt_embeds.zero_()  # callers own what they get
    assert not torch.equal(
        encoder.encode("a [cat:dog:2]", steps=STEPS).at_step(3).prompt_embeds, again.at_step(3).prompt_embeds
    )


class UnetInputs:
    """Records the text conditioning the UNet receives at every call of the denoising loop."""

    def __init__(self) -> None:
        self.embeds: list[torch.Tensor] = []
        self.pooled: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs) -> None:
        self.embeds.append(kwargs["encoder_hidden_states"].clone())
        self.pooled.append(kwargs["added_cond_kwargs"]["text_embeds"].clone())


def run_pipeline(pipe, encoded: list[EncodedPrompts], images: list[int], guidance: float) -> tuple:
    cfg = guidance > 1.0

    def batch(parts):
        if parts[0] is None:
            return None
        return torch.cat(
            [part.repeat(count, *([1] * (part.ndim - 1))) for part, count in zip(parts, images, strict=True)]
        )

    steps_seen: list[int] = []

    def progress(pipe_, step, timestep, tensors):
        steps_seen.append(step)
        return tensors

    callback, inputs = conditioning_callback(encoded, images, cfg, then=progress)
    recorder = UnetInputs()
    handle = pipe.unet.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        latents = pipe(
            prompt_embeds=batch([e.prompt_embeds for e in encoded]),
            pooled_prompt_embeds=batch([e.pooled_prompt_embeds for e in encoded]),
            negative_prompt_embeds=batch([e.negative_prompt_embeds for e in encoded]) if cfg else None,
            negative_pooled_prompt_embeds=batch([e.negative_pooled_prompt_embeds for e in encoded]) if cfg else None,
            num_inference_steps=STEPS,
            height=64,
            width=64,
            guidance_scale=guidance,
            output_type="latent",
            generator=[torch.Generator().manual_seed(3 + k) for k in range(sum(images))],
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=inputs,
        ).images
    finally:
        handle.remove()
    assert steps_seen == list(range(STEPS))
    return latents, recorder


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_the_denoising_loop_sees_each_steps_conditioning(pipe, encoder, guidance: float) -> None:
    cfg = guidance > 1.0
    edited = encoder.encode(
        "a [cat:dog:1] on a [mat|rug]", negative_prompt="[ugly:blurry:2]", steps=STEPS, do_classifier_free_guidance=cfg
    )
    plain = encoder.encode("a bird", negative_prompt="noise", steps=STEPS, do_classifier_free_guidance=cfg)
    latents, seen = run_pipeline(pipe, [edited, plain], [2, 1], guidance)
    assert len(seen.embeds) == STEPS
    for step in range(STEPS):
        now = edited.at_step(step)
        positive = torch.cat([now.prompt_embeds] * 2 + [plain.prompt_embeds])
        pooled = torch.cat([now.pooled_prompt_embeds] * 2 + [plain.pooled_prompt_embeds])
        if cfg:
            positive = torch.cat(
                [torch.cat([now.negative_prompt_embeds] * 2 + [plain.negative_prompt_embeds]), positive]
            )
            pooled = torch.cat(
                [torch.cat([now.negative_pooled_prompt_embeds] * 2 + [plain.negative_pooled_prompt_embeds]), pooled]
            )
        assert torch.equal(seen.embeds[step], positive), step
        assert torch.equal(seen.pooled[step], pooled), step
    # The texts really change between steps 0 and 3, and the run is reproducible.
    assert not torch.equal(seen.embeds[0], seen.embeds[3])
    again, _ = run_pipeline(pipe, [edited, plain], [2, 1], guidance)
    assert torch.equal(latents, again)


def test_without_editing_the_callback_is_the_callers_own(encoder) -> None:
    plain = encoder.encode("a cat", steps=STEPS)

    def progress(pipe_, step, timestep, tensors):
        return tensors

    assert conditioning_callback([plain], [1], True, then=progress) == (progress, ["latents"])
    assert conditioning_callback([plain], [1], True) == (None, ["latents"])


def test_alternations_cannot_multiply_the_encoding_work(encoder) -> None:
    """Each distinct text of a schedule is encoded and held: their padded chunks together are bounded."""
    from worker.prompting.chunks import MAX_CHUNKS_PER_SCHEDULE

    words = " ".join(["cat"] * 60)
    # Alternations of 2, 3, 5 and 7 options repeat only every 210 steps: 150 distinct texts of 4 chunks each.
    prompt = " ".join("[" + "|".join(f"{words} {letter}" for letter in "abcdefg"[:n]) + "]" for n in (2, 3, 5, 7))
    with pytest.raises(
        InvalidRequest,
        match=rf"prompt: prompt editing makes 150 distinct texts, each held at the longest one's length \(\d+ chunks "
        rf"or more\): at least \d+ chunks of conditioning, over the limit of {MAX_CHUNKS_PER_SCHEDULE}",
    ):
        encoder.encode(prompt, steps=150)
    # Without steps (no editing) it is one text holding every option: 14 chunks, fine; with 10 steps, 10 texts, fine.
    assert encoder.encode(prompt, do_classifier_free_guidance=False).num_chunks == 14
    assert len(encoder.encode(prompt, steps=10, do_classifier_free_guidance=False).info["schedule"]["texts"]) == 10


def test_the_padded_schedule_not_the_sum_of_its_texts_is_bounded(pipe, encoder) -> None:
    """Issue 24: one long text and many short ones summed to 212 chunks (under 256) but every segment is padded to the
    long one's 63 chunks: 150 x 63 = 9,450 chunks were held (537 MiB on the dev model, 5.5 GiB of fp16 SDXL)."""
    import time

    from worker.prompting.chunks import MAX_CHUNKS_PER_SCHEDULE

    alternations = " ".join("[" + "|".join(f"w{n}{k}" for k in range(n)) + "]" for n in (2, 3, 5, 7))
    long_text = "x BREAK " * 62 + "x"  # 63 chunks
    started = time.process_time()  # CPU time: other processes on a busy machine do not count
    with pytest.raises(InvalidRequest, match=r"prompt: prompt editing makes 150 distinct texts.* at least 9450 chunks"):
        encoder.encode(f"[{long_text}::1] {alternations}", negative_prompt="blurry", steps=150)
    assert time.process_time() - started < 5.0  # refused while tokenizing, before any text is encoded

    # At the limit, the conditioning held is what the limit says: texts x chunks x 77 rows x width, on both sides.
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    eight_chunks = "x BREAK " * 7 + "x "
    options = "|".join(f"v{k}" for k in range(32))
    at_limit = encoder.encode(f"{eight_chunks}[{options}]", negative_prompt="blurry", steps=32)
    assert len(at_limit.info["schedule"]["texts"]) * at_limit.num_chunks == 32 * 8 == MAX_CHUNKS_PER_SCHEDULE
    held = {id(s.conditioning): s.conditioning for s in at_limit.segments}.values()
    side_bytes = sum(c.prompt_embeds.nbytes + c.negative_prompt_embeds.nbytes for c in held)
    assert side_bytes == MAX_CHUNKS_PER_SCHEDULE * 77 * width * at_limit.prompt_embeds.element_size() * 2
    with pytest.raises(InvalidRequest, match=r"33 distinct texts.* at least 264 chunks of conditioning, over the"):
        encoder.encode(f"{eight_chunks}[{options}|v32]", negative_prompt="blurry", steps=33)


def test_an_editing_job_through_the_engine(dev_model_dir: Path) -> None:
    """A job with prompt editing: step k's conditioning is the segment's plain text's, the images are reproducible,
    the metadata reports the schedule, and a job without editing is unchanged by the callback."""
    from worker.generation.engine import Engine
    from worker.request.schema import parse_request

    engine = Engine(dev_model_dir)
    job = {
        "prompt": "a [red:blue:2] cube on a [table|chair]",
        "negative_prompt": "blurry",
        "num_inference_steps": STEPS,
        "width": 256,
        "height": 256,
        "num_images": 2,
        "seed": 11,
        "guidance_scale": 5.0,
        "scheduler": "Euler",
    }
    recorder = UnetInputs()
    handle = engine.pipe.unet.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        result = engine.generate(parse_request(job))
    finally:
        handle.remove()
    texts = ["a red cube on a table", "a red cube on a table", "a red cube on a chair", "a blue cube on a table"]
    for step, text in enumerate(texts):
        plain = engine.prompt_encoder.encode(text, negative_prompt="blurry")
        expected = torch.cat([plain.negative_prompt_embeds] * 2 + [plain.prompt_embeds] * 2)
        assert torch.equal(recorder.embeds[step], expected.to(recorder.embeds[step].dtype)), step
        pooled = torch.cat([plain.negative_pooled_prompt_embeds] * 2 + [plain.pooled_prompt_embeds] * 2)
        assert torch.equal(recorder.pooled[step], pooled.to(recorder.pooled[step].dtype)), step
    schedule = result.metadata.to_dict()["prompt"]["schedule"]
    # A1111's schedule: [red:blue:2] ends at step 2, the alternation at every step; the last segment (step 4) is
    # read only by schedulers that take more model evaluations than steps.
    assert [segment["steps"] for segment in schedule["segments"]] == [[0, 1], [2, 2], [3, 3], [4, 4]]
    assert schedule["texts"][schedule["segments"][2]["texts"]] == {
        "prompt": "a blue cube on a table",
        "negative_prompt": "blurry",
    }
    again = engine.generate(parse_request(job))
    assert [image.tobytes() for image in again.images] == [image.tobytes() for image in result.images]
