"""CLIP tokenizers built offline from the BPE merges file that ships inside this package.

``clip_bpe_simple_vocab_16e6.txt.gz`` is OpenAI's CLIP BPE file as shipped in the ``open-clip-torch``
wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``, MIT licence). Every Stable Diffusion text encoder
(SD 1.x's CLIP ViT-L, SD 2.x's and SDXL's OpenCLIP ViT-H / bigG) uses this one vocabulary; the
tokenizers differ only in their padding token. The hub's ``vocab.json`` / ``merges.txt`` are derived
from the file the way open_clip's ``SimpleTokenizer`` does, so nothing is fetched.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

BPE_FILE = Path(__file__).with_name("clip_bpe_simple_vocab_16e6.txt.gz")
#: Merges CLIP actually uses: the file's first line is a header, the vocabulary is capped at 49408.
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
#: Padding token of each tokenizer kind: SD 1.x pads with end-of-text, OpenCLIP models with "!" (id 0).
PAD_TOKENS = {"clip": EOS, "openclip": "!"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the BPE alphabet), as CLIP defines it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@functools.cache
def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's ``vocab.json`` (token -> id) and ``merges.txt`` lines, derived from the BPE file."""
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(kind: str = "clip") -> Any:
    """A ``transformers.CLIPTokenizer`` for ``kind`` (``clip`` or ``openclip``), max length 77."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD_TOKENS[kind],
        model_max_length=MAX_LENGTH,
    )
