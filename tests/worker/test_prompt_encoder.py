"""PromptEncoder on the dev model: bit-exact with diffusers for short prompts, long prompts, BREAK, commas, weights,
negatives, the cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from core.errors import InvalidRequest
from tests.support.dev_pipes import load_dev_pipe
from tests.support.prompt_reference import a1111_chunks
from worker.prompting.chunks import COMMA_BACKTRACK, MAX_CHUNKS_PER_PROMPT, chunk_weighted_tokens
from worker.prompting.encoding import PromptEncoder
from worker.prompting.weighting import DEFAULT_WEIGHTING, WEIGHTING_MODES, apply_token_weights

BOS, EOS, PAD, COMMA = 49406, 49407, 0, 267
WIDTH_1 = 32  # the dev model's text_encoder width; text_encoder_2 is 64 wide


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The dev model's matrices are tiny: one thread is faster, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(dev_model_dir: Path):
    return load_dev_pipe(dev_model_dir)


@pytest.fixture(scope="module")
def encoder(pipe) -> PromptEncoder:
    return PromptEncoder(pipe, cache_bytes=0)


@pytest.fixture(scope="module")
def words(pipe) -> list[str]:
    """Lower-case ASCII words that are whole tokens of the real CLIP vocabulary."""
    vocabulary = pipe.tokenizer.get_vocab()
    return sorted(
        key[:-4]
        for key in vocabulary
        if key.endswith("</w>") and key[:-4].isascii() and key[:-4].isalpha() and key[:-4].islower()
    )


def count_tokens(pipe, text: str) -> int:
    return len(pipe.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def diffusers_encode(
    pipe, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None, clip_skip=None, cfg=True
):
    return pipe.encode_prompt(
        prompt,
        prompt_2,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2,
        clip_skip=clip_skip,
    )


def assert_identical(ours: tuple, theirs: tuple) -> None:
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, mine, reference in zip(names, ours, theirs, strict=True):
        if reference is None:
            assert mine is None, name
            continue
        assert mine.dtype == reference.dtype and mine.device == reference.device, name
        assert mine.shape == reference.shape, name
        assert torch.equal(mine, reference), f"{name} differs by {(mine - reference).abs().max()}"


def chunk(embeds: torch.Tensor, index: int) -> torch.Tensor:
    return embeds[0, 77 * index : 77 * (index + 1)]


# ---- equivalence with diffusers -------------------------------------------------------------------------------------


@settings(max_examples=120)
@given(data=st.data())
def test_short_prompts_equal_diffusers_bit_for_bit(pipe, encoder, words, data) -> None:
    separators = st.sampled_from([" ", " ", " ", ", ", ": ", ". ", "! ", " - "])
    text = st.lists(st.tuples(st.sampled_from(words), separators), max_size=36).map(
        lambda pairs: "".join(word + separator for word, separator in pairs).strip()
    )
    prompt = data.draw(text, "prompt")
    prompt_2 = data.draw(st.none() | text, "prompt_2")
    negative_prompt = data.draw(st.none() | st.just("") | text, "negative_prompt")
    negative_prompt_2 = data.draw(st.none() | text, "negative_prompt_2")
    clip_skip = data.draw(st.sampled_from([None, 0, 1]), "clip_skip")
    cfg = data.draw(st.booleans(), "cfg")
    force_zeros = data.draw(st.booleans(), "force_zeros_for_empty_prompt")
    for value in (prompt, prompt_2, negative_prompt, negative_prompt_2):
        assume(value is None or count_tokens(pipe, value) <= 75)

    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    try:
        ours = encoder.encode(prompt, prompt_2, negative_prompt, negative_prompt_2, clip_skip, cfg)
        theirs = diffusers_encode(pipe, prompt, prompt_2, negative_prompt, negative_prompt_2, clip_skip, cfg)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    assert_identical(ours.tensors(), theirs)
    assert ours.num_chunks == 1


@pytest.mark.parametrize("num_words", [0, 1, 74, 75])
def test_boundary_lengths_equal_diffusers(pipe, encoder, words, num_words: int) -> None:
    prompt = " ".join(words[1000 : 1000 + num_words])
    assert count_tokens(pipe, prompt) == num_words
    assert_identical(
        encoder.encode(prompt, negative_prompt="blurry").tensors(), diffusers_encode(pipe, prompt, None, "blurry")
    )


def test_tokenizer_2s_added_pad_token_is_respected(pipe, encoder) -> None:
    """tokenizer_2 has "!" (its pad) as an added token, so "!!" tokenizes differently there; one tokenizer call may
    serve both encoders only for texts without it."""
    text = "wow!! a great view"
    first, second = (t(text, add_special_tokens=False).input_ids for t in (pipe.tokenizer, pipe.tokenizer_2))
    assert first != second
    assert chunk_contents(encoder.tokenize(text, 0).input_ids) == [first]
    assert chunk_contents(encoder.tokenize(text, 1).input_ids) == [second]
    for prompt in (text, "a great view"):
        assert_identical(
            encoder.encode(prompt, negative_prompt=prompt).tensors(), diffusers_encode(pipe, prompt, None, prompt)
        )


def test_short_prompt_gives_the_same_latents_as_stock_diffusers(pipe, encoder) -> None:
    def latents(**kwargs) -> torch.Tensor:
        return pipe(
            num_inference_steps=2,
            height=64,
            width=64,
            guidance_scale=5.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(7),
            **kwargs,
        ).images

    prompt, negative = "a photo of an astronaut riding a horse on mars", "blurry, low quality"
    encoded = encoder.encode(prompt, negative_prompt=negative)
    ours = latents(
        prompt_embeds=encoded.prompt_embeds,
        pooled_prompt_embeds=encoded.pooled_prompt_embeds,
        negative_prompt_embeds=encoded.negative_prompt_embeds,
        negative_pooled_prompt_embeds=encoded.negative_pooled_prompt_embeds,
    )
    assert torch.equal(ours, latents(prompt=prompt, negative_prompt=negative))


# ---- chunking -------------------------------------------------------------------------------------------------------


def chunk_contents(rows: list[list[int]]) -> list[list[int]]:
    return [row[1 : row.index(EOS, 1)] for row in rows]


def plain_chunks(runs, **kwargs):
    return chunk_weighted_tokens(
        runs, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, comma_token_id=COMMA, **kwargs
    )


token_stream = st.lists(
    st.one_of(st.integers(1, 9), st.just(COMMA), st.none()),  # None: a BREAK
    max_size=400,
)


@given(token_stream, st.floats(0.5, 2.0))
def test_chunker_keeps_every_token_in_order(stream: list[int | None], weight: float) -> None:
    runs = [None if token is None else ([token], weight if token % 2 else 1.0) for token in stream]
    result = plain_chunks(runs)
    tokens = [token for token in stream if token is not None]
    contents = chunk_contents(result.input_ids)
    assert [token for content in contents for token in content] == tokens
    assert result.num_tokens == len(tokens)
    for row, row_weights, content in zip(result.input_ids, result.weights, contents, strict=True):
        assert len(row) == len(row_weights) == 77
        assert 0 <= len(content) <= 75
        assert row == [BOS, *content, EOS] + [PAD] * (75 - len(content))
        assert row_weights[0] == row_weights[len(content) + 1 :][0] == 1.0
        assert row_weights[1 : len(content) + 1] == [weight if token % 2 else 1.0 for token in content]
    if None not in stream:
        assert len(contents) == 1 or all(contents), "without BREAK, no empty chunk unless the prompt is empty"

    # Where chunks end: at a BREAK, at 75 tokens, or after a comma among the last 20 tokens (the backtrack).
    break_positions, position = set(), 0
    for token in stream:
        if token is None:
            break_positions.add(position)
        else:
            position += 1
    boundaries, position = set(), 0
    for content in contents[:-1]:
        position += len(content)
        boundaries.add(position)
        if position not in break_positions and len(content) != 75:
            assert content[-1] == COMMA and len(content) >= 75 - COMMA_BACKTRACK + 1
    assert {p for p in break_positions if 0 < p < len(tokens)} <= boundaries


@given(
    st.lists(st.one_of(st.integers(1, 9), st.just(COMMA), st.none()), max_size=600),
    st.sampled_from([0, 5, COMMA_BACKTRACK]),
)
def test_chunker_matches_a1111_token_by_token(stream: list[int | None], backtrack: int) -> None:
    def weight_of(token: int) -> float:
        return 1.0 + token / 10

    runs = [None if token is None else ([token], weight_of(token)) for token in stream]
    result = plain_chunks(runs, comma_backtrack=backtrack)
    expected = a1111_chunks(runs, COMMA, backtrack=backtrack)
    assert chunk_contents(result.input_ids) == [tokens for tokens, _ in expected]
    assert [row[1 : len(tokens) + 1] for row, (tokens, _) in zip(result.weights, expected, strict=True)] == [
        weights for _, weights in expected
    ]


def test_comma_backtrack_moves_the_tail_to_the_next_chunk() -> None:
    stream = [5] * 70 + [COMMA] + [6] * 10  # the comma is the 71st token: 4 tokens after it still fit
    contents = chunk_contents(plain_chunks([(stream, 1.0)]).input_ids)
    assert contents == [[5] * 70 + [COMMA], [6] * 10]
    # Without the backtrack, or with the comma too far back, the chunk is simply cut at 75.
    assert chunk_contents(plain_chunks([(stream, 1.0)], comma_backtrack=0).input_ids) == [stream[:75], stream[75:]]
    far = [5] * 50 + [COMMA] + [6] * 30
    assert chunk_contents(plain_chunks([(far, 1.0)]).input_ids) == [far[:75], far[75:]]


def test_break_and_empty_prompts() -> None:
    assert chunk_contents(plain_chunks([]).input_ids) == [[]]
    # As A1111: a leading or doubled BREAK closes an empty chunk (a padding chunk); a trailing one adds nothing.
    runs = [None, ([1, 2], 1.0), None, None, ([3], 1.0), None]
    assert chunk_contents(plain_chunks(runs).input_ids) == [[], [1, 2], [], [3]]
    assert chunk_contents(plain_chunks([None]).input_ids) == [[]]
    assert chunk_contents(plain_chunks([([1], 1.0), None]).input_ids) == [[1]]


def test_long_prompt_keeps_every_token(pipe, encoder, words) -> None:
    prompt = ", ".join(" ".join(words[i : i + 7]) for i in range(0, 880, 7))  # ~1,000 tokens with many commas
    ids = pipe.tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
    assert len(ids) >= 1000
    for index in (0, 1):
        tokenized = encoder.tokenize(prompt, index)
        assert tokenized.num_tokens == len(ids)
        assert [token for content in chunk_contents(tokenized.input_ids) for token in content] == ids
        assert tokenized.num_chunks >= 14
        pad = pipe.tokenizer.pad_token_id if index == 0 else pipe.tokenizer_2.pad_token_id
        assert all(row[-1] == pad for row in tokenized.input_ids[:-1] if len(row) == 77)


def test_long_prompt_encodes_chunks_independently_and_pools_the_first(pipe, encoder, words) -> None:
    prompt = " ".join(words[2000:2160])  # 160 tokens: chunks of 75, 75, 10
    encoded = encoder.encode(prompt, negative_prompt="blurry")
    assert encoded.num_chunks == 3
    assert encoded.prompt_embeds.shape == encoded.negative_prompt_embeds.shape == (1, 231, 96)
    rows = [encoder.tokenize(prompt, 0).input_ids, encoder.tokenize(prompt, 1).input_ids]
    with torch.no_grad():
        for index in range(3):
            first = pipe.text_encoder(torch.tensor([rows[0][index]]), output_hidden_states=True).hidden_states[-2]
            second = pipe.text_encoder_2(torch.tensor([rows[1][index]]), output_hidden_states=True)
            expected = torch.cat([first, second.hidden_states[-2]], dim=-1)[0]
            torch.testing.assert_close(chunk(encoded.prompt_embeds, index), expected, rtol=1e-6, atol=1e-6)
            if index == 0:
                torch.testing.assert_close(encoded.pooled_prompt_embeds, second[0], rtol=1e-6, atol=1e-6)
    info = encoded.info
    assert info["positive"] == {
        "text_encoder": {"tokens": 160, "chunks": 3},
        "text_encoder_2": {"tokens": 160, "chunks": 3},
    }
    assert info["negative"]["text_encoder"] == {"tokens": 1, "chunks": 1}
    json.dumps(info)


def test_break_starts_a_new_chunk(pipe, encoder) -> None:
    encoded = encoder.encode("a red cat BREAK a blue dog", do_classifier_free_guidance=False)
    assert encoded.num_chunks == 2
    assert encoded.info["breaks"] == {"prompt": 1}
    alone = encoder.encode("a blue dog", do_classifier_free_guidance=False)
    torch.testing.assert_close(chunk(encoded.prompt_embeds, 1), chunk(alone.prompt_embeds, 0), rtol=1e-6, atol=1e-6)
    first = encoder.encode("a red cat", do_classifier_free_guidance=False)
    torch.testing.assert_close(encoded.pooled_prompt_embeds, first.pooled_prompt_embeds, rtol=1e-6, atol=1e-6)


def test_comma_backtrack_in_real_prompts(pipe, encoder, words) -> None:
    prompt = " ".join(words[3000:3070]) + ", " + " ".join(words[3070:3080])
    contents = chunk_contents(encoder.tokenize(prompt, 0).input_ids)
    assert [len(content) for content in contents] == [71, 10]
    assert contents[0][-1] == pipe.tokenizer.get_vocab()[",</w>"]


# ---- weights --------------------------------------------------------------------------------------------------------


def test_multiply_scales_exactly_the_weighted_rows(pipe) -> None:
    encoder = PromptEncoder(pipe, cache_bytes=0, weighting="multiply")
    plain = encoder.encode("a cat on a mat", negative_prompt="ugly blurry")
    weighted = encoder.encode("a (cat:1.5) on a mat", negative_prompt="ugly [blurry]")
    cat_row, blurry_row = 2, 2  # BOS, a, cat / BOS, ugly, blurry
    rows = torch.arange(77) != cat_row
    assert torch.equal(weighted.prompt_embeds[0, rows], plain.prompt_embeds[0, rows])
    assert torch.equal(weighted.prompt_embeds[0, cat_row], plain.prompt_embeds[0, cat_row] * 1.5)
    assert torch.equal(
        weighted.negative_prompt_embeds[0, blurry_row], plain.negative_prompt_embeds[0, blurry_row] * (1 / 1.1)
    )
    # Weights act on the sequence embeddings only; the pooled vector is the transformer's, as in A1111.
    assert torch.equal(weighted.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    assert weighted.info["weighted"] == [
        {"field": "prompt", "text": "cat", "weight": 1.5, "count": 1},
        {"field": "negative_prompt", "text": "blurry", "weight": round(1 / 1.1, 6), "count": 1},
    ]
    assert weighted.info["weighting"] == "multiply"
    same = encoder.encode("a (cat:1.5)", negative_prompt="a (cat:1.5)").info["weighted"]
    assert [entry["field"] for entry in same] == ["prompt", "negative_prompt"]


def test_restore_mean_scales_then_restores_each_encoders_chunk_mean(pipe) -> None:
    encoder = PromptEncoder(pipe, cache_bytes=0, weighting="restore_mean")
    plain = encoder.encode("a cat on a mat", do_classifier_free_guidance=False).prompt_embeds[0]
    weighted = encoder.encode("a ((cat)) on a mat", do_classifier_free_guidance=False).prompt_embeds[0]
    for features in (slice(0, WIDTH_1), slice(WIDTH_1, None)):
        original, result = plain[:, features], weighted[:, features]
        multiplied = original.clone()
        multiplied[2] *= 1.21
        factor = original.mean() / multiplied.mean()
        torch.testing.assert_close(result, multiplied * factor, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.mean(), original.mean(), rtol=1e-5, atol=1e-7)


def test_weights_in_one_chunk_leave_the_others_alone(pipe, words) -> None:
    for weighting in WEIGHTING_MODES:
        encoder = PromptEncoder(pipe, cache_bytes=0, weighting=weighting)
        first, second = " ".join(words[4000:4075]), " ".join(words[4075:4100])
        plain = encoder.encode(f"{first} {second}", do_classifier_free_guidance=False).prompt_embeds
        weighted = encoder.encode(f"{first} ({second}:1.4)", do_classifier_free_guidance=False).prompt_embeds
        assert torch.equal(chunk(weighted, 0), chunk(plain, 0))
        assert not torch.equal(chunk(weighted, 1), chunk(plain, 1))


def test_apply_token_weights_guards_a_zero_mean() -> None:
    hidden = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])  # mean 0, and still 0 after weighting
    weights = torch.tensor([[2.0, 1.0]])
    assert torch.equal(apply_token_weights(hidden, weights, "restore_mean"), hidden * weights[..., None])
    unweighted = torch.ones(1, 2)
    assert apply_token_weights(hidden, unweighted, "restore_mean") is hidden
    large = torch.full((1, 2, 2), 60_000.0, dtype=torch.float16)
    assert torch.isfinite(apply_token_weights(large, weights, "multiply")).all()  # clamped, not inf
    with pytest.raises(ValueError, match="weighting"):
        apply_token_weights(hidden, weights, "bogus")


# ---- negatives and the two encoders ---------------------------------------------------------------------------------


def test_negative_longer_than_positive_pads_the_positive(pipe, encoder, words) -> None:
    negative = " ".join(words[5000:5200])  # 200 tokens: 3 chunks
    encoded = encoder.encode("a cat", negative_prompt=negative)
    assert encoded.num_chunks == 3
    assert encoded.prompt_embeds.shape == encoded.negative_prompt_embeds.shape == (1, 231, 96)
    empty = diffusers_encode(pipe, "", cfg=False)[0][0]  # the padding chunk is the empty prompt's encoding
    torch.testing.assert_close(chunk(encoded.prompt_embeds, 1), empty, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunk(encoded.prompt_embeds, 2), empty, rtol=1e-6, atol=1e-6)
    short = diffusers_encode(pipe, "a cat", cfg=False)
    torch.testing.assert_close(chunk(encoded.prompt_embeds, 0), short[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(encoded.pooled_prompt_embeds, short[2], rtol=1e-6, atol=1e-6)


def test_absent_negative_follows_diffusers(pipe, encoder, words) -> None:
    prompt = " ".join(words[6000:6100])  # 2 chunks
    encoded = encoder.encode(prompt)
    assert encoded.info["negative_source"] == "zeros"
    assert torch.equal(encoded.negative_prompt_embeds, torch.zeros(1, 154, 96))
    assert torch.equal(encoded.negative_pooled_prompt_embeds, torch.zeros(1, 64))

    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        encoded = encoder.encode(prompt)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    empty = diffusers_encode(pipe, "", cfg=False)
    for index in range(2):  # "" then one padding chunk: both the empty prompt's encoding
        torch.testing.assert_close(chunk(encoded.negative_prompt_embeds, index), empty[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(encoded.negative_pooled_prompt_embeds, empty[2], rtol=1e-6, atol=1e-6)

    off = encoder.encode(prompt, negative_prompt="blurry", do_classifier_free_guidance=False)
    assert off.negative_prompt_embeds is None and off.negative_pooled_prompt_embeds is None
    assert off.info["negative_source"] == "none" and off.info["negative"] is None


def test_prompt_2_longer_than_prompt_pads_encoder_1(pipe, encoder, words) -> None:
    prompt_2 = " ".join(words[7000:7100])
    encoded = encoder.encode("a cat", prompt_2=prompt_2, do_classifier_free_guidance=False)
    assert encoded.num_chunks == 2
    assert encoded.info["positive"] == {
        "text_encoder": {"tokens": 2, "chunks": 1},
        "text_encoder_2": {"tokens": 100, "chunks": 2},
    }
    empty = diffusers_encode(pipe, "", cfg=False)[0][0]
    second = chunk(encoded.prompt_embeds, 1)
    torch.testing.assert_close(second[:, :WIDTH_1], empty[:, :WIDTH_1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(second[:, WIDTH_1:], empty[:, WIDTH_1:])


def test_long_prompt_end_to_end_through_the_pipeline(pipe, encoder, words) -> None:
    prompt = " ".join(f"({w}:1.2)" if i % 9 == 0 else w for i, w in enumerate(words[8000:9000]))
    encoded = encoder.encode(prompt, negative_prompt="blurry BREAK ugly")
    assert encoded.info["positive"]["text_encoder"]["tokens"] >= 1000
    assert encoded.info["weighted"][0]["weight"] == 1.2
    latents = pipe(
        prompt_embeds=encoded.prompt_embeds,
        pooled_prompt_embeds=encoded.pooled_prompt_embeds,
        negative_prompt_embeds=encoded.negative_prompt_embeds,
        negative_pooled_prompt_embeds=encoded.negative_pooled_prompt_embeds,
        num_images_per_prompt=2,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="latent",
    ).images
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()


# ---- cache ----------------------------------------------------------------------------------------------------------


def test_cache_hits_copies_and_keys(pipe) -> None:
    entry_bytes = PromptEncoder(pipe, cache_bytes=0).encode("a cat", negative_prompt="blurry").nbytes()
    encoder = PromptEncoder(pipe, cache_bytes=2 * entry_bytes)
    first = encoder.encode("a cat", negative_prompt="blurry")
    assert first.info["cache_hit"] is False
    second = encoder.encode("a cat", negative_prompt="blurry")
    assert second.info["cache_hit"] is True
    assert_identical(second.tensors(), first.tensors())
    assert second.prompt_embeds.data_ptr() != first.prompt_embeds.data_ptr()
    second.prompt_embeds.zero_()  # the caller owns what it gets: the cache is not touched
    second.info["weighted"].append("mutated")
    third = encoder.encode("a cat", negative_prompt="blurry")
    assert torch.equal(third.prompt_embeds, first.prompt_embeds) and "mutated" not in third.info["weighted"]

    # Everything that changes the result is in the key.
    assert not encoder.encode("a cat", negative_prompt="blurry", clip_skip=1).info["cache_hit"]
    assert not encoder.encode("a cat", negative_prompt="blurry", do_classifier_free_guidance=False).info["cache_hit"]
    # Bounded in bytes (two full entries here), least recently used first out.
    assert not encoder.encode("a cat", negative_prompt="blurry").info["cache_hit"]
    assert len(encoder._cache) == 2 and encoder.cache_bytes <= 2 * entry_bytes
    encoder.clear_cache()
    assert not encoder.encode("a cat", negative_prompt="blurry").info["cache_hit"]
    assert encoder.encode("a cat", prompt_2="a cat", negative_prompt="blurry").info["cache_hit"]  # same texts


def test_cache_notices_text_encoder_adapters(dev_model_dir: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    own_pipe = load_dev_pipe(dev_model_dir)  # adapters are not removed cleanly: keep them off the shared pipe
    encoder = PromptEncoder(own_pipe)
    before = encoder.encode("a cat")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, own_pipe.text_encoder, adapter_name="style")
    after = encoder.encode("a cat")  # no clear_cache(): the adapter fingerprint changed
    assert not after.info["cache_hit"]
    assert not torch.equal(after.prompt_embeds, before.prompt_embeds)
    assert encoder.encode("a cat").info["cache_hit"]
    for module in own_pipe.text_encoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_scale("style", 0.5)  # what set_adapters(..., adapter_weights=[0.5]) does
    assert not encoder.encode("a cat").info["cache_hit"]
    encoder.clear_cache()
    assert not encoder.encode("a cat").info["cache_hit"]


def test_model_cpu_offload_hooks_are_respected(dev_model_dir: Path) -> None:
    """Through accelerate's hooks (the worker's "model" offload plan; "cpu" stands in for the GPU here)."""
    own_pipe = load_dev_pipe(dev_model_dir)
    own_encoder = PromptEncoder(own_pipe)
    prompt = "a cat " * 60
    before = own_encoder.encode(prompt, negative_prompt="blurry")
    own_pipe.enable_model_cpu_offload(device="cpu")
    after = own_encoder.encode(prompt, negative_prompt="blurry")
    assert not after.info["cache_hit"]  # the placement changed: devices found again, and a new cache key
    assert_identical(after.tensors(), before.tensors())
    assert all(hasattr(module, "_hf_hook") for module in (own_pipe.text_encoder, own_pipe.text_encoder_2))


# ---- validation -----------------------------------------------------------------------------------------------------


def test_bad_arguments_get_clear_errors(pipe, encoder) -> None:
    layers = min(pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers)
    assert encoder.max_clip_skip == layers - 2  # the job path's rule: 10 for SDXL's 12-layer CLIP-L
    deepest = encoder.max_clip_skip
    encoder.encode("a cat", clip_skip=deepest)
    with pytest.raises(
        InvalidRequest, match=rf"clip_skip: {deepest + 1} is deeper than this model allows; use 0\.\.{deepest}"
    ):
        encoder.encode("a cat", clip_skip=deepest + 1)
    with pytest.raises(InvalidRequest, match="clip_skip"):
        encoder.encode("a cat", clip_skip=-1)
    with pytest.raises(InvalidRequest, match="deeper than this model allows"):
        encoder.check_clip_skip(deepest + 1)  # the engine's early check asks the encoder: one bound
    encoder.check_clip_skip(None)
    encoder.check_clip_skip(deepest)
    assert str(InvalidRequest("x")).startswith("invalid input")
    with pytest.raises(TypeError, match="prompt"):
        encoder.encode(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="negative_prompt"):
        encoder.encode("a cat", negative_prompt=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weighting"):
        PromptEncoder(pipe, weighting="bogus")
    assert DEFAULT_WEIGHTING in WEIGHTING_MODES


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("prompt", {}),
        ("prompt_2", {"prompt_2": "x BREAK " * 100}),
        ("negative_prompt", {"negative_prompt": "x BREAK " * 100}),
        ("negative_prompt_2", {"negative_prompt": "ok", "negative_prompt_2": "x BREAK " * 100}),
    ],
)
def test_chunks_per_prompt_are_limited(encoder, field: str, kwargs: dict) -> None:
    """Issue 13 item 4: BREAK multiplies chunks; the limit names the field, the count and the limit."""
    prompt = "a cat" if kwargs else "x BREAK " * 100
    with pytest.raises(InvalidRequest) as error:
        encoder.encode(prompt, **kwargs)
    message = str(error.value)
    assert message.startswith(f"invalid input: {field}: 100 chunks") and str(MAX_CHUNKS_PER_PROMPT) in message
    # At the limit it works: MAX - 1 BREAKs make MAX chunks.
    at_limit = encoder.encode("x BREAK " * (MAX_CHUNKS_PER_PROMPT - 1) + "x", do_classifier_free_guidance=False)
    assert at_limit.num_chunks == MAX_CHUNKS_PER_PROMPT


def test_the_attack_prompt_is_refused_fast(encoder) -> None:
    import time

    prompt = ("x BREAK " * 2500)[:20_000]  # 2,500 chunks: 32 s per job on the dev model before the limit
    started = time.process_time()  # CPU time: other processes on a busy machine do not count
    with pytest.raises(InvalidRequest, match=r"prompt: 2500 chunks"):
        encoder.encode(prompt)
    assert time.process_time() - started < 2.0


def test_overflowing_weights_are_refused_and_extreme_ones_taken_as_written(pipe, encoder) -> None:
    with pytest.raises(InvalidRequest, match=r"negative_prompt: the weight of 'x' is inf"):
        encoder.encode("a cat", negative_prompt="(x:" + "9" * 400 + ")")
    plain = encoder.encode("a cat on a mat", do_classifier_free_guidance=False)
    for weight in (0.0, -1.0, 200.0):  # A1111 takes them as written; so does the encoder (no clamping to 0.01..100)
        weighted = encoder.encode(f"a (cat:{weight:g}) on a mat", do_classifier_free_guidance=False)
        torch.testing.assert_close(
            weighted.prompt_embeds[0, 2], plain.prompt_embeds[0, 2] * weight, rtol=1e-5, atol=1e-5
        )


def test_cache_is_bounded_in_bytes(pipe) -> None:
    short = PromptEncoder(pipe, cache_bytes=0).encode("a cat", negative_prompt="blurry").nbytes()
    long_prompt = "x BREAK " * 20 + "x"  # 21 chunks: 21 times the bytes of a short prompt
    encoder = PromptEncoder(pipe, cache_bytes=10 * short)
    for index in range(8):
        encoder.encode(f"a cat number {index}", negative_prompt="blurry")
    assert len(encoder._cache) == 8 and encoder.cache_bytes == 8 * short
    encoder.encode(long_prompt, negative_prompt="blurry")  # larger than the whole budget: not kept, nothing evicted
    assert len(encoder._cache) == 8 and not encoder.encode(long_prompt, negative_prompt="blurry").info["cache_hit"]
    medium = "x BREAK " * 4 + "x"  # 5 chunks: evicts the three least recently used short entries
    encoder.encode(medium, negative_prompt="blurry")
    assert encoder.cache_bytes <= 10 * short and len(encoder._cache) == 6
    assert encoder.encode(medium, negative_prompt="blurry").info["cache_hit"]
    assert not encoder.encode("a cat number 0", negative_prompt="blurry").info["cache_hit"]
    assert encoder.encode("a cat number 7", negative_prompt="blurry").info["cache_hit"]


def test_cuda_graphs_are_a_constructor_choice(pipe) -> None:
    """The worker passes settings.prompt_encoder_cuda_graphs; graphs never apply to CPU inputs (replay equality is
    checked where CUDA is: the next test, and bench/smoke.py on the GPU machine)."""
    eager = PromptEncoder(pipe, cache_bytes=0, cuda_graphs=False)
    default = PromptEncoder(pipe, cache_bytes=0)
    assert eager._graphs is None and default._graphs is not None
    assert not default._graphs.applies_to(pipe.text_encoder, torch.zeros(1, 77, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs replay only on a CUDA device")
def test_cuda_graph_replay_equals_eager(dev_model_dir: Path) -> None:
    cuda_pipe = load_dev_pipe(dev_model_dir).to("cuda")
    eager = PromptEncoder(cuda_pipe, cache_bytes=0, cuda_graphs=False)
    graphed = PromptEncoder(cuda_pipe, cache_bytes=0)
    for prompt in ("a cat", "a (cat:1.3) on a mat BREAK at night, " * 6):
        expected = eager.encode(prompt, negative_prompt="dog").tensors()
        for _ in range(2):  # the first call captures, the second replays
            assert_identical(graphed.encode(prompt, negative_prompt="dog").tensors(), expected)
    assert graphed._graphs.broken is None and len(graphed._graphs._graphs) > 0


@settings(max_examples=80)
@given(data=st.data())
def test_token_rows_and_weights_match_a1111(pipe, encoder, words, data) -> None:
    """Parse, tokenize per run and chunk as A1111 does (tests/support/prompt_reference.py), against the encoder."""
    from tests.support.prompt_reference import a1111_parse_prompt_attention, has_bracketed_break

    pieces = st.sampled_from([
        "(", ")", "[", "]", ":1.3)", ":0)", ":-1)", ": 1.2)", ": .5 )", " BREAK ", ", ", " ", "\\", "\\(", "sun", "set",
    ])  # fmt: skip
    parts = data.draw(st.lists(pieces | st.sampled_from(words[2000:2100]), max_size=60), "parts")
    prompt = "".join(parts)
    try:
        reference = a1111_parse_prompt_attention(prompt)
    except ValueError:
        return  # A1111 raises on a malformed number; literal text here (deliberate difference 2)
    assume(not has_bracketed_break(reference))  # deliberate difference 1
    runs = [
        None if (text, weight) == ("BREAK", -1) else (pipe.tokenizer(text, add_special_tokens=False).input_ids, weight)
        for text, weight in reference
    ]
    expected = a1111_chunks(runs, COMMA)
    ours = encoder.tokenize(prompt, 0)
    assert chunk_contents(ours.input_ids) == [tokens for tokens, _ in expected]
    assert [row[1 : len(tokens) + 1] for row, (tokens, _) in zip(ours.weights, expected, strict=True)] == [
        weights for _, weights in expected
    ]


def test_sunset_is_one_word_as_in_a1111(pipe, encoder) -> None:
    rows = chunk_contents(encoder.tokenize("((sun[(set)]))", 0).input_ids)
    assert rows == [pipe.tokenizer("sunset", add_special_tokens=False).input_ids]
