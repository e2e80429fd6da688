"""A1111 emphasis syntax: parsing, and what it does to the text conditioning."""

from __future__ import annotations

import pytest
import torch

from difftool.plugins.builtin.sd import loader, pipeline
from difftool.plugins.builtin.sd.prompt_chunks import chunk_prompt
from difftool.plugins.builtin.sd.prompt_weights import parse
from difftool.plugins.builtin.sd.tokenizer import clip_tokenizer

from . import tiny


def test_parse_follows_a1111() -> None:
    assert parse("a cat") == [("a cat", 1.0)]
    assert parse("a (red:1.5) car") == [("a ", 1.0), ("red", 1.5), (" car", 1.0)]
    assert parse("((big)) [dog]") == [("big", pytest.approx(1.21)), (" ", 1.0), ("dog", pytest.approx(1 / 1.1))]
    assert parse(r"a \(literal\) x") == [("a (literal) x", 1.0)]
    assert parse("(open ended") == [("open ended", pytest.approx(1.1))]
    assert parse("(a (b:2) c:0.5)") == [("a ", 0.5), ("b", 1.0), (" c", 0.5)]


def test_weighted_ids_match_plain_tokenization_and_pad() -> None:
    tokenizer = clip_tokenizer("clip")
    [chunk] = chunk_prompt(tokenizer, "a photo of a (cat:1.3)")
    ids, weights = chunk.ids, chunk.weights
    plain = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids == plain and len(weights) == 77
    assert weights[5] == pytest.approx(1.3) and weights[:5] == [1.0] * 5 and weights[6:] == [1.0] * 71


def test_emphasis_scales_only_its_tokens_and_weight_one_changes_nothing(tmp_path) -> None:
    model = loader.load_sd_model(tiny.save_folder(tiny.components(seed=2), tmp_path / "m"))
    plain = pipeline.encode_prompt(model, "a photo of a cat", "").cond["encoder_hidden_states"]
    same = pipeline.encode_prompt(model, "a photo of a (cat:1.0)", "").cond["encoder_hidden_states"]
    strong = pipeline.encode_prompt(model, "a photo of a (cat:1.5)", "").cond["encoder_hidden_states"]
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, strong)
    assert strong.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4)  # the mean is restored
    ratio = (strong / plain)[0, :, 0]  # every token is rescaled by the same mean factor, cat by 1.5 more
    assert ratio[5].item() == pytest.approx(1.5 * ratio[4].item(), rel=1e-4)


@pytest.mark.parametrize("prompt", ["(word:.)", "a (word:1.2.3) b", "((x:..):2)"])
def test_a_weight_that_is_not_a_number_is_the_users_typo_in_one_line(prompt: str) -> None:
    """Issue 29 item 17: ``float('.')`` raised ValueError inside the task, blamed on the plugin's author."""
    from difftool.core.errors import ParameterError

    with pytest.raises(ParameterError, match=r"prompt weight '[.\d]+' in .* is not a number; write \(word:1\.2\)"):
        parse(prompt)


def test_a_prompt_of_bytes_that_are_not_utf8_is_refused_in_one_line() -> None:
    """Issue 29 item 17: a ``--prompt`` in another encoding arrives with lone surrogates (surrogateescape),
    which the tokenizer took for a TypeError."""
    from difftool.core.errors import ParameterError

    with pytest.raises(ParameterError, match=r"a prompt holds bytes that are not UTF-8 text \(at character 2\)"):
        chunk_prompt(clip_tokenizer("clip"), b"a \xff tower".decode("utf-8", "surrogateescape"))
    assert parse("caf\u00e9 \u732b") == [("caf\u00e9 \u732b", 1.0)]  # real non-ASCII text is fine
