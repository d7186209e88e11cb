"""The real Llama-3 tokenizer (tiktoken file from `llama-models`) as a Hugging Face `tokenizer.json`."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 128256
BOS_TOKEN = "<|begin_of_text|>"
BOS_TOKEN_ID = 128000
EOT_TOKEN = "<|eot_id|>"
EOT_TOKEN_ID = 128009

# Strings whose encodings must match tiktoken's exactly: plain text, digits, whitespace runs, non-Latin scripts,
# emoji and the header/turn special tokens the chat template writes.
SELF_CHECK_TEXTS = (
    "Hello, world! What's in this image?",
    "  leading spaces,\ttabs\n\nand newlines\r\n  ",
    "Numbers 1234567 and 3.14159; contractions: I'm, you'll, they'd.",
    "Ünïcödé: 日本語のテキスト, Ελληνικά, русский текст 🦙🖼️",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nDescribe it.<|eot_id|>",
)


@cache
def _llama3_tiktoken() -> tuple[Path, Any]:
    """The tokenizer file and `llama_models` tokenizer (tiktoken based; the package is installed with --no-deps)."""
    try:
        from llama_models.llama3 import tokenizer as llama3_tokenizer
    except ImportError as err:
        raise RuntimeError(
            "the Llama-3 tokenizer comes from the `llama-models` package: pip install --no-deps llama-models"
        ) from err
    path = Path(llama3_tokenizer.__file__).parent / "tokenizer.model"
    return path, llama3_tokenizer.Tokenizer(path)


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens in id order (128000..128255), with the names `llama-models` gives them."""
    _, llama3 = _llama3_tiktoken()
    return sorted(llama3.special_tokens, key=llama3.special_tokens.__getitem__)


def build_tokenizer() -> Tokenizer:
    """Convert the tiktoken ranks to a `tokenizers` BPE and add the LLaVA image placeholder after the specials."""
    path, llama3 = _llama3_tiktoken()
    specials = llama3_special_tokens()
    converter = TikTokenConverter(vocab_file=str(path), pattern=llama3.pat_str, extra_special_tokens=specials)
    tokenizer = converter.converted()
    # The chat template writes BOS itself, so encoding must not prepend one; the converter's ByteLevel
    # post-processor only adjusts offsets.
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    _check_ids(tokenizer, llama3.special_tokens)
    return tokenizer


def _check_ids(tokenizer: Tokenizer, special_tokens: dict[str, int]) -> None:
    """Fail loudly if the conversion shifted any id the runtime or the template relies on."""
    expected = {BOS_TOKEN: BOS_TOKEN_ID, EOT_TOKEN: EOT_TOKEN_ID, IMAGE_TOKEN: IMAGE_TOKEN_ID}
    expected.update(special_tokens)
    for token, token_id in expected.items():
        got = tokenizer.token_to_id(token)
        if got != token_id:
            raise AssertionError(f"tokenizer conversion: {token} has id {got}, expected {token_id}")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != IMAGE_TOKEN_ID + 1:
        raise AssertionError(f"tokenizer conversion: vocabulary size {size}, expected {IMAGE_TOKEN_ID + 1}")


def check_against_tiktoken(tokenizer: Tokenizer, texts: tuple[str, ...] = SELF_CHECK_TEXTS) -> None:
    """Encode each text with both tokenizers (special tokens allowed) and require identical ids and decoding."""
    _, llama3 = _llama3_tiktoken()
    for text in texts:
        want = llama3.model.encode(text, allowed_special="all")
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != want:
            raise AssertionError(f"tokenizer.json disagrees with tiktoken on {text!r}: {got} != {want}")
        decoded = tokenizer.decode(got, skip_special_tokens=False)
        if decoded != text:
            raise AssertionError(f"tokenizer.json does not round-trip {text!r}: {decoded!r}")


def write_tokenizer_json(path: Path) -> Path:
    """Build, self-check and save `tokenizer.json`."""
    tokenizer = build_tokenizer()
    check_against_tiktoken(tokenizer)
    tokenizer.save(str(path))
    return path
