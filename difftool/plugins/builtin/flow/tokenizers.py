"""The tokenizers SD3 and Flux use, built offline from files that ship in difftool.

CLIP-L and CLIP-G share CLIP's BPE vocabulary (the SD plugin's shipped file; CLIP-G pads with "!", as
in SDXL). ``t5_tokenizer.json.gz`` is the T5 v1.1 SentencePiece vocabulary (32,000 pieces + 100 extra
ids) in the ``tokenizers`` JSON form, as shipped in the ``diffsynth`` 1.1.7 wheel
(``diffsynth/tokenizer_configs/flux/tokenizer_2/tokenizer.json``, Apache-2.0; Google's T5 vocabulary,
Apache-2.0): see NOTICE.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

T5_FILE = Path(__file__).with_name("t5_tokenizer.json.gz")


@functools.cache
def _t5_json() -> str:
    return gzip.decompress(T5_FILE.read_bytes()).decode("utf-8")


def t5_tokenizer(max_length: int = 512) -> Any:
    """A ``transformers.T5TokenizerFast`` (pads with ``<pad>``, ends with ``</s>``)."""
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        tokenizer_object=Tokenizer.from_str(_t5_json()),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=100,
        model_max_length=max_length,
    )


def clip_tokenizer(role: str) -> Any:
    """CLIP-L's tokenizer (pads with end-of-text) or CLIP-G's (pads with "!"), max length 77."""
    from difftool.plugins.builtin.sd.tokenizer import clip_tokenizer as build

    return build("openclip" if role == "clip_g" else "clip")


def folder_tokenizer(folder: Path, role: str) -> Any:
    """A diffusers folder's own tokenizer when it has one, else the shipped one for ``role``."""
    if role == "t5":
        if (folder / "tokenizer.json").is_file():
            from transformers import T5TokenizerFast

            return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
        return t5_tokenizer()
    if (folder / "tokenizer_config.json").is_file() and (folder / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return clip_tokenizer(role)
