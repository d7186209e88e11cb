"""Parity of the Rust runtime's text side (`llama3v tokenize`) with tiktoken and transformers.

- Encoding: the real Llama-3 vocabulary (the tiktoken file shipped by `llama-models`, converted to
  tokenizer.json), on a seeded corpus of >= 10,000 strings: many scripts, emoji (ZWJ, flags, keycaps, tags),
  numbers of every length, whitespace runs, control characters, text that spells special tokens, empty and
  very long strings. Ids must equal tiktoken's (`allowed_special="all"`) and transformers'
  (`add_special_tokens=False`).
- Decoding: the Rust `decode` and the streaming decoder against transformers' `decode`, on the corpus' ids and
  on id windows that cut characters apart.
- Chat templates: rendered text and ids against `apply_chat_template`, for the LLaVA-Llama-3 template the test
  models use and a transcription of the Llama-3.1 Instruct template; jinja features on a tiny tokenizer.

The binary is target/debug/llama3v (build it with `cargo build -p llama3v-cli`), or $LLAMA3V_BIN.
"""

# The Llama-3.1 template below is transcribed verbatim, long lines included.
# ruff: noqa: E501

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("LLAMA3V_BIN", REPO / "target" / "debug" / "llama3v"))
SEED = 20240726
N_RANDOM = 10_000

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
IMAGE = "<image>"
IMAGE_ID = 128256
# The Llama-3 pre-tokenizer pattern (llama_models.llama3.tokenizer.Tokenizer.pat_str).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The template the llama3v test models use (image parts in order).

# The chat templates the Rust and Python tests share (tests/data): the one the llama3v test models use (the
# exporter's `llama3v-tiny` writes it; a test below keeps the two equal) and Meta-Llama-3.1-8B-Instruct's
# (tokenizer_config.json), transcribed verbatim.
DATA = REPO / "tests" / "data"
LLAVA_TEMPLATE = (DATA / "llava_llama3.jinja").read_text(encoding="utf-8")
LLAMA31_TEMPLATE = (DATA / "llama31_instruct.jinja").read_text(encoding="utf-8")

# ------------------------------------------------------------------------------------------------------------
# Running the binary


def run_bin(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not BIN.is_file():
        pytest.fail(f"{BIN} not found: build it with `cargo build -p llama3v-cli` or set LLAMA3V_BIN")
    proc = subprocess.run(
        [str(BIN), "tokenize", *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=1200,
    )
    assert "panicked" not in proc.stderr, proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"llama3v tokenize {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def write_jsonl(path: Path, values: list) -> Path:
    # ensure_ascii keeps every line pure ASCII, so no character can break the line structure.
    path.write_text("".join(json.dumps(v) + "\n" for v in values), encoding="utf-8")
    return path


def read_jsonl(text: str) -> list:
    # Not splitlines(): it also splits on U+2028, U+0085, ..., which JSON strings may hold unescaped.
    return [json.loads(line) for line in text.split("\n") if line]


def report(name: str, mismatches: list, total: int, show: int = 5) -> None:
    print(f"{name}: {len(mismatches)} mismatches out of {total}")
    for m in mismatches[:show]:
        print("   ", m)


# ------------------------------------------------------------------------------------------------------------
# Tokenizers


def _own_conversion(path: Path) -> None:
    """Fallback when `llama3v_export` is not installed: the same conversion, done here."""
    from llama_models.llama3 import tokenizer as llama3_tokenizer
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model = Path(llama3_tokenizer.__file__).parent / "tokenizer.model"
    llama3 = llama3_tokenizer.Tokenizer(model)
    specials = sorted(llama3.special_tokens, key=llama3.special_tokens.__getitem__)
    tok = TikTokenConverter(vocab_file=str(model), pattern=llama3.pat_str, extra_special_tokens=specials).converted()
    tok.add_special_tokens([AddedToken(IMAGE, normalized=False, special=True)])
    tok.save(str(path))


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama3_tok") / "tokenizer.json"
    try:
        from llama3v_export.tokenizer import write_tokenizer_json
    except ImportError:
        _own_conversion(path)
    else:
        write_tokenizer_json(path)
    return path


@pytest.fixture(scope="session")
def tiktoken_enc():
    import tiktoken
    from llama_models.llama3 import tokenizer as llama3_tokenizer
    from llama_models.tokenizer_utils import load_bpe_file

    model = Path(llama3_tokenizer.__file__).parent / "tokenizer.model"
    llama3 = llama3_tokenizer.Tokenizer(model)
    assert llama3.pat_str == LLAMA3_PATTERN
    return tiktoken.Encoding(
        name="llama3v",
        pat_str=llama3.pat_str,
        mergeable_ranks=load_bpe_file(model),
        special_tokens={**llama3.special_tokens, IMAGE: IMAGE_ID},
    )


def hf_tokenizer(tokenizer_file: Path, chat_template: str | None = None):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), bos_token=BOS, eos_token=EOT, clean_up_tokenization_spaces=False
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def hf_tok(tokenizer_json):
    return hf_tokenizer(tokenizer_json)


# ------------------------------------------------------------------------------------------------------------
# The corpus

SCRIPT_RANGES = [
    (0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xFF), (0x100, 0x17F), (0x180, 0x24F), (0x250, 0x2AF),  # Latin, IPA
    (0x370, 0x3FF), (0x400, 0x4FF), (0x531, 0x587), (0x591, 0x5F4), (0x600, 0x6FF), (0x700, 0x74F),
    (0x900, 0x97F), (0x980, 0x9FF), (0xA00, 0xA7F), (0xB80, 0xBFF), (0xC00, 0xC7F), (0xD00, 0xD7F),
    (0xE00, 0xE7F), (0xE80, 0xEFF), (0xF00, 0xFDA), (0x10A0, 0x10FF), (0x1100, 0x11FF), (0x1200, 0x137F),
    (0x13A0, 0x13F5), (0x1780, 0x17FF), (0x1800, 0x18AF), (0x1E00, 0x1EFF), (0x1F00, 0x1FFF),
    (0x3040, 0x309F), (0x30A0, 0x30FF), (0x3100, 0x312F), (0x4E00, 0x9FFF), (0xA000, 0xA48C),
    (0xAC00, 0xD7A3), (0xFB00, 0xFB4F), (0xFF01, 0xFF5E), (0xFF61, 0xFFDC),
    (0x10330, 0x1034A), (0x12000, 0x12399), (0x1D400, 0x1D7FF), (0x20000, 0x2A6DF),
]  # fmt: skip
WORDS = [
    "the", "The", "quick", "brown", "fox", "jumps", "über", "naïve", "café", "façade", "Ærøskøbing", "straße",
    "日本語", "中文字符", "한국어", "ภาษาไทย", "русский", "Ελληνικά", "עברית", "العربية", "हिन्दी", "বাংলা",
    "தமிழ்", "ქართული", "Հայերեն", "አማርኛ", "ខ្មែរ", "ᠮᠣᠩᠭᠣᠯ", "Tiếng Việt", "İstanbul", "ŁÓDŹ", "ǅemal",
    "ﬁnance", "ﬀ", "ℌ𝔢𝔩𝔩𝔬", "𝐁𝐨𝐥𝐝", "Ⅻ", "½", "²³", "①②", "٣٤٥", "१२३", "１２３", "Ⅷ", "𒀀𒀁",
    "e\u0301", "n\u0303o", "a\u0308\u0304", "\u0301\u0301x",
]  # fmt: skip
EMOJI = [
    "😀", "😂", "🦙", "🖼️", "❤️", "👍🏽", "👋🏿", "🇫🇷", "🇯🇵🇺🇸", "1️⃣", "#️⃣", "©️", "™", "☺", "✅",
    "👨‍👩‍👧‍👦", "👩‍💻", "🏳️‍🌈", "🧑🏽‍🚀", "👩🏻‍❤️‍💋‍👨🏼", "🏴‍☠️", "🐈‍⬛", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "\u200d", "\ufe0f",
    "🫠", "🪿", "🧌",
]  # fmt: skip
SPACES = [
    " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\r\n\r\n", " \n", "\n ", "\x0b", "\x0c", "\xa0", "\u2003",
    "\u3000", "\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x1f", "\u200b", "\u180e", "\ufeff", "\u202f",
]  # fmt: skip
PUNCT = [
    *".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`'\"", "...", "—", "–", "«", "»", "„", "“", "”", "’", "¿", "¡", "、", "。", "・",
]  # fmt: skip
CONTRACTIONS = [
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'LL", "'D", "it's", "I'M", "y'all",
    "''s", "’s", "'ſ", "'K", "'ﬆ", "'İ", "'ß", "'sss", "'dd", "'",
]  # fmt: skip
CODE = [
    "def f(x):\n    return x ** 2\n",
    'if (a && b) { console.log("hi"); }',
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    '<div class="x">&amp;</div>',
    "\\frac{a}{b} + \\sum_{i=0}^{n} x_i",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "    indented\n\t\ttabbed\n",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "SELECT * FROM t WHERE x >= 10;",
]


def special_token_names() -> list[str]:
    from llama_models.llama3 import tokenizer as llama3_tokenizer

    llama3 = llama3_tokenizer.Tokenizer(Path(llama3_tokenizer.__file__).parent / "tokenizer.model")
    return [*llama3.special_tokens, IMAGE]


def make_corpus() -> list[str]:
    rng = random.Random(SEED)
    specials = special_token_names()
    near_specials = [
        "<|eot_id", "<|eot_id|", "eot_id|>", "<|EOT_ID|>", "< |eot_id|>", "<image", "image>", "<<image>>",
        "<|<|eot_id|>|>", "<im<image>age>", "<|reserved_special_token_999|>", "<|begin_of_text|><|begin_of_text|>",
    ]  # fmt: skip

    def script_text(n: int) -> str:
        lo, hi = rng.choice(SCRIPT_RANGES)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(n))

    def number() -> str:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
        return rng.choice([
            digits, "-" + digits, digits + "." + digits[::-1], f"{rng.randint(0, 10**9):,}", f"{rng.random():.12g}",
            f"{rng.uniform(-1e30, 1e30):e}", "0x" + digits, digits + "th", "v" + ".".join(digits[:6]),
            "x" + digits + "y",
        ])  # fmt: skip

    def any_char() -> str:
        while True:
            cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF),
                             rng.randint(0x10000, 0x10FFFF)])  # fmt: skip
            if not 0xD800 <= cp <= 0xDFFF:  # surrogates are not text
                return chr(cp)

    def fragment() -> str:
        kind = rng.randrange(13)
        if kind == 0:
            return script_text(rng.randint(1, 12))
        if kind == 1:
            return rng.choice(WORDS)
        if kind == 2:
            return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4)))
        if kind == 3:
            return number()
        if kind == 4:
            return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 6))) * rng.choice([1, 1, 2, 7])
        if kind == 5:
            return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 5)))
        if kind == 6:
            return rng.choice(CONTRACTIONS)
        if kind == 7:
            return rng.choice(specials) if rng.random() < 0.7 else rng.choice(near_specials)
        if kind == 8:
            return rng.choice(CODE)
        if kind == 9:
            return "".join(any_char() for _ in range(rng.randint(1, 6)))
        if kind == 10:
            return "".join(chr(rng.randint(0, 0x20)) for _ in range(rng.randint(1, 4)))
        if kind == 11:  # characters of the byte-level alphabet itself
            return "".join(chr(rng.choice([0x120, 0x10A, 0x109, 0x100, 0x143, 0xA1, 0xFF])) for _ in range(3))
        return " " * rng.randint(1, 40) + rng.choice(WORDS)

    corpus = ["", "", " ", "\n", "a", "<|begin_of_text|>", IMAGE, "Hello, world!"]
    corpus += specials
    corpus += ["".join(chr(c) for c in range(i, i + 64)) for i in range(0, 0x3000, 64)]  # every BMP start char
    for n in range(1, 65):
        corpus.append("1" * n)
        corpus.append("".join(str((i * 7) % 10) for i in range(n)))
        corpus.append(" " * n)
        corpus.append(" " * n + "x")
        corpus.append("\t" * n + "\n")
        corpus.append("\r\n" * n)
    while len(corpus) < N_RANDOM + 500:
        parts = [fragment() for _ in range(rng.choice([1, 1, 2, 3, 5, 8, 13]))]
        sep = rng.choice(["", " ", "", "\n", " "])
        corpus.append(sep.join(parts))
    # Very long strings: mixed text, and long runs of one kind of character.
    for _ in range(24):
        corpus.append("".join(fragment() for _ in range(rng.randint(1_000, 6_000))))
    corpus += [
        " " * 20_000,
        "\n" * 5_000,
        "9" * 10_000,
        "a" * 5_000,
        "ab " * 10_000,
        "😀" * 3_000,
        "日本" * 5_000,
        ("word " * 2_000 + "\r\n") * 5,
        "<|eot_id|>" * 2_000,
        " \t" * 5_000 + "x",
    ]
    return corpus


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def rust_ids(tokenizer_json, corpus, tmp_path_factory) -> list[list[int]]:
    path = write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus)
    out = read_jsonl(run_bin("--tokenizer", tokenizer_json, "--batch-jsonl", path).stdout)
    assert len(out) == len(corpus)
    return out


# ------------------------------------------------------------------------------------------------------------
# Encoding


def test_corpus_shape(corpus):
    assert len(corpus) >= 10_000
    assert "" in corpus
    assert max(map(len, corpus)) >= 20_000
    assert sum("\u200d" in s for s in corpus) > 100  # ZWJ sequences
    assert sum(IMAGE in s for s in corpus) > 100
    print(f"corpus: {len(corpus)} strings, {sum(map(len, corpus)):,} characters")


def test_ids_match_tiktoken(corpus, rust_ids, tiktoken_enc):
    mismatches = []
    for text, got in zip(corpus, rust_ids, strict=True):
        want = tiktoken_enc.encode(text, allowed_special="all")
        if got != want:
            mismatches.append((text[:80], got[:20], want[:20]))
    report("rust vs tiktoken", mismatches, len(corpus))
    assert not mismatches


def test_ids_match_transformers(corpus, rust_ids, hf_tok):
    want_all = hf_tok(corpus, add_special_tokens=False)["input_ids"]
    mismatches = [
        (text[:80], got[:20], want[:20])
        for text, got, want in zip(corpus, rust_ids, want_all, strict=True)
        if got != want
    ]
    report("rust vs transformers", mismatches, len(corpus))
    assert not mismatches


def test_special_token_ids(tokenizer_json):
    out = json.loads(run_bin("--tokenizer", tokenizer_json, "--json", "--text", f"{BOS}x{EOT}{IMAGE}").stdout)
    assert out["ids"] == [128000, 87, 128009, IMAGE_ID]


# ------------------------------------------------------------------------------------------------------------
# Decoding and streaming


def check_decoding(tokenizer_json, hf_tok, id_lists, tmp_path, skip_special: bool) -> list:
    path = write_jsonl(tmp_path / f"ids_{skip_special}.jsonl", id_lists)
    args = ["--tokenizer", tokenizer_json, "--decode-jsonl", path]
    if skip_special:
        args.append("--skip-special-tokens")
    out = read_jsonl(run_bin(*args).stdout)
    assert len(out) == len(id_lists)
    want_all = hf_tok.batch_decode(id_lists, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)
    mismatches = []
    for ids, got, want in zip(id_lists, out, want_all, strict=True):
        chunks = got["chunks"]
        if got["text"] != want:
            mismatches.append(("decode", ids[:12], got["text"][:40], want[:40]))
        elif "".join(chunks) != want:
            mismatches.append(("stream", ids[:12], chunks[:8], want[:40]))
        elif len(chunks) != len(ids) + 1:
            mismatches.append(("chunk count", ids[:12], len(chunks)))
    return mismatches


def test_decode_round_trip_and_stream(corpus, rust_ids, tokenizer_json, hf_tok, tmp_path):
    mismatches = check_decoding(tokenizer_json, hf_tok, rust_ids, tmp_path, skip_special=False)
    report("decode/stream vs transformers (corpus ids)", mismatches, len(rust_ids))
    assert not mismatches
    # Encoding is lossless: decoding the corpus ids gives the corpus back.
    out = read_jsonl(
        run_bin("--tokenizer", tokenizer_json, "--decode-jsonl", write_jsonl(tmp_path / "c.jsonl", rust_ids)).stdout
    )
    lossy = [text[:60] for text, got in zip(corpus, out, strict=True) if got["text"] != text]
    report("round trip", lossy, len(corpus))
    assert not lossy


def test_decode_split_sequences(rust_ids, tokenizer_json, hf_tok, tmp_path):
    """Windows of the corpus ids (cutting characters at both ends) and random ids, incl. invalid UTF-8."""
    rng = random.Random(SEED + 1)
    pool = [ids for ids in rust_ids if len(ids) >= 2]
    id_lists = []
    for _ in range(3_000):
        ids = rng.choice(pool)
        start = rng.randrange(len(ids))
        id_lists.append(ids[start : start + rng.randint(1, 40)])
    for _ in range(2_000):
        # Byte-level tokens for bytes 0x80..0xFF are ids 0..255 region in this vocabulary; mix with any id.
        id_lists.append(
            [rng.choice([rng.randrange(256), rng.randrange(IMAGE_ID + 1)]) for _ in range(rng.randint(0, 30))]
        )
    for skip in (False, True):
        mismatches = check_decoding(tokenizer_json, hf_tok, id_lists, tmp_path, skip_special=skip)
        report(
            f"decode/stream vs transformers (split sequences, skip_special_tokens={skip})", mismatches, len(id_lists)
        )
        assert not mismatches


def test_stream_holds_split_characters(tokenizer_json, tmp_path, tiktoken_enc):
    """A character cut across byte-level tokens never shows up as U+FFFD in a chunk."""
    text = "👨‍👩‍👧‍👦 日本語 🏴󠁧󠁢󠁳󠁣󠁴󠁿 Ωmega"
    ids = tiktoken_enc.encode(text)
    assert len(ids) > len(text.split())  # byte-level pieces split the characters
    out = read_jsonl(
        run_bin("--tokenizer", tokenizer_json, "--decode-jsonl", write_jsonl(tmp_path / "e.jsonl", [ids])).stdout
    )[0]
    assert out["text"] == text
    assert "".join(out["chunks"]) == text
    assert not any("\ufffd" in c for c in out["chunks"])
    assert sum(1 for c in out["chunks"] if c == "") > 0


# ------------------------------------------------------------------------------------------------------------
# Chat templates


def _user(*parts):
    content = []
    for p in parts:
        content.append({"type": "image"} if p is IMAGE else {"type": "text", "text": p})
    return {"role": "user", "content": content}


CHATS_LIST_CONTENT = [
    [_user(IMAGE, "What is in this image?")],
    [_user("What is in this image?", IMAGE)],
    [_user("Compare", IMAGE, "with", IMAGE, "please.")],
    [_user(IMAGE, IMAGE, IMAGE)],
    [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}, _user(IMAGE, "Describe.")],
    [
        {"role": "system", "content": "  Answer briefly.  "},
        _user(IMAGE, "  What colour is it?\n"),
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        _user("And the shape?"),
        {"role": "assistant", "content": "Round."},
        _user(IMAGE, "Now this one?"),
    ],
    [_user("")],
    [_user("spells tokens: <|eot_id|><|begin_of_text|> and <image> inside text")],
    [_user("日本語 😀 👨‍👩‍👧‍👦\r\n\ttabs  and  spaces ")],
    [{"role": "user", "content": "plain string content"}, {"role": "assistant", "content": "ok"}],
]  # fmt: skip

CHATS_STRING_CONTENT = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": " You are a pirate. "}, {"role": "user", "content": "Who are you?"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 3+3?\n\n"},
    ],
    [{"role": "user", "content": "日本語 😀 <|eot_id|> {{ not a template }} {% raw %}"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "\n"}],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": {"city": "Paris", "unit": "c", "days": [1, 2], "exact": 1.5},
                    },
                }
            ],
        },
        {"role": "tool", "content": 'sunny, 25°C <b>"hot"</b>'},
        {"role": "ipython", "content": {"temp": 25, "sky": "clear", "note": None}},
    ],
]


def render_with_rust(tokenizer_json, template: str, chats: list, gen: bool, tmp_path: Path) -> list[dict]:
    tpl = tmp_path / "template.jinja"
    tpl.write_text(template, encoding="utf-8")
    path = write_jsonl(tmp_path / "chats.jsonl", chats)
    args = ["--tokenizer", tokenizer_json, "--chat-template", tpl, "--batch-jsonl", path]
    if not gen:
        args.append("--no-generation-prompt")
    out = read_jsonl(run_bin(*args).stdout)
    assert len(out) == len(chats)
    return out


@pytest.mark.parametrize("gen", [True, False], ids=["gen_prompt", "no_gen_prompt"])
@pytest.mark.parametrize(
    ("template", "chats"),
    [
        (LLAVA_TEMPLATE, CHATS_LIST_CONTENT + CHATS_STRING_CONTENT[:5]),
        (LLAMA31_TEMPLATE, CHATS_STRING_CONTENT),
    ],
    ids=["llava_llama3", "llama31_instruct"],
)
def test_chat_matches_transformers(tokenizer_json, template, chats, gen, tmp_path):
    tok = hf_tokenizer(tokenizer_json, template)
    got = render_with_rust(tokenizer_json, template, chats, gen, tmp_path)
    mismatches = []
    for chat, out in zip(chats, got, strict=True):
        text = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        ids = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
        if out["text"] != text:
            mismatches.append(("text", out["text"], text))
        elif out["ids"] != list(ids):
            mismatches.append(("ids", out["ids"][:20], list(ids)[:20]))
        # BOS is written once, by the template; the tokenizer adds none (BOS spelled in the content is parsed).
        if out["ids"][:2] != [128000, out["ids"][1]] or out["ids"].count(128000) != out["text"].count(BOS):
            mismatches.append(("bos", out["ids"][:5]))
    report(f"chat rendering vs apply_chat_template (gen={gen})", mismatches, len(chats), show=3)
    assert not mismatches


def test_single_messages_file(tokenizer_json, tmp_path):
    """`--messages FILE` and its plain and --json outputs agree with the batch mode."""
    tpl = tmp_path / "t.jinja"
    tpl.write_text(LLAVA_TEMPLATE, encoding="utf-8")
    chat = CHATS_LIST_CONTENT[2]
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps(chat), encoding="utf-8")
    common = ["--tokenizer", tokenizer_json, "--chat-template", tpl, "--messages", msgs]
    as_json = json.loads(run_bin(*common, "--json").stdout)
    batch = render_with_rust(tokenizer_json, LLAVA_TEMPLATE, [chat], True, tmp_path)[0]
    assert as_json == batch
    assert as_json["text"].count(IMAGE) == 2
    assert as_json["ids"].count(IMAGE_ID) == 2
    plain = run_bin(*common).stdout
    assert plain.endswith(f"--- {len(as_json['ids'])} tokens\n{' '.join(map(str, as_json['ids']))}\n")
    assert plain.startswith(as_json["text"])
    no_gen = json.loads(run_bin(*common, "--json", "--no-generation-prompt").stdout)
    assert no_gen["text"].endswith("<|eot_id|>")


def test_text_inputs(tokenizer_json, tmp_path):
    text = "Hello\r\n  world 🦙\n"
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode("utf-8"))
    a = json.loads(run_bin("--tokenizer", tokenizer_json, "--json", "--text", text).stdout)
    b = json.loads(run_bin("--tokenizer", tokenizer_json, "--json", "--text-file", f).stdout)
    assert a == b == {"text": text, "ids": a["ids"]}
    plain = run_bin("--tokenizer", tokenizer_json, "--text", text).stdout
    assert plain == " ".join(map(str, a["ids"])) + "\n"


def test_model_dir(tokenizer_json, tmp_path):
    """--model DIR reads the tokenizer, template and special tokens from manifest.json's `text` section."""
    (tmp_path / "tok.json").write_bytes(tokenizer_json.read_bytes())
    text = {"tokenizer_file": "tok.json", "bos_token": BOS, "eos_token": EOT, "chat_template": LLAVA_TEMPLATE}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "llama3v-model", "text": text}), encoding="utf-8")
    chat = CHATS_LIST_CONTENT[0]
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps(chat), encoding="utf-8")
    got = json.loads(run_bin("--model", tmp_path, "--messages", msgs, "--json").stdout)
    want = hf_tokenizer(tokenizer_json, LLAVA_TEMPLATE).apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert got["ids"] == list(want)
    assert got["ids"][0] == 128000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "x"], "--model"),  # no tokenizer source
        (["--tokenizer", "/nonexistent/tokenizer.json", "--text", "x"], "/nonexistent/tokenizer.json"),
        (["--tokenizer", "{tok}", "--chat-template", "{ok_tpl}", "--messages", "{bad_json}"], "JSON"),
        (["--tokenizer", "{tok}", "--chat-template", "{ok_tpl}", "--messages", "{not_list}"], "list"),
        (["--tokenizer", "{tok}", "--messages", "{ok_chat}"], "chat template"),  # no template given
        (["--tokenizer", "{tok}", "--chat-template", "{raising}", "--messages", "{ok_chat}"], "roles must"),
        (["--tokenizer", "{tok}", "--chat-template", "{broken}", "--messages", "{ok_chat}"], "syntax"),
        (["--tokenizer", "{tok}", "--batch-jsonl", "{bad_jsonl}"], "line 2"),
        (["--tokenizer", "{tok}", "--decode-jsonl", "{bad_jsonl}"], "line 1"),
    ],
)
def test_errors_are_reported_not_panics(tokenizer_json, tmp_path, args, message):
    files = {
        "tok": tokenizer_json,
        "bad_json": "[{",
        "not_list": '{"role": "user"}',
        "ok_chat": '[{"role": "assistant", "content": "x"}]',
        "ok_tpl": LLAVA_TEMPLATE,
        "raising": "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}",
        "broken": "{% for m in messages %}",
        "bad_jsonl": '"ok"\n{"not": "a string"}\n',
    }
    paths = {}
    for name, content in files.items():
        if isinstance(content, Path):
            paths[name] = str(content)
        else:
            p = tmp_path / f"{name}.txt"
            p.write_text(content, encoding="utf-8")
            paths[name] = str(p)
    proc = run_bin(*[a.format(**paths) for a in args], check=False)
    assert proc.returncode != 0
    assert message.lower() in proc.stderr.lower(), proc.stderr


# ------------------------------------------------------------------------------------------------------------
# Jinja features, on a tiny tokenizer (only the rendered text matters here)


@pytest.fixture(scope="session")
def tiny_tokenizer_json(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOT, IMAGE])
    path = tmp_path_factory.mktemp("tiny") / "tokenizer.json"
    tok.save(str(path))
    return path


FEATURE_TEMPLATES = {
    "whitespace_control": "{%- for m in messages -%}\n  [{{- m.role -}}]\n{%- endfor %}\n\n",
    "trim_blocks": "{% for m in messages %}\n    {% if m.role %}\n{{ m.role }}\n    {% endif %}\n{% endfor %}\nend\n",
    "trailing_newline": "x\n",
    "py_methods": (
        "{% for m in messages if m.content is string %}{{ m.content.strip() }}|{{ m.content.lstrip() }}|{{ m.content.rstrip('!? ') }}|"
        "{{ m.content.split() }}|{{ m.content.split(' ', 1) }}|{{ m.content.upper() }}|{{ m.content.lower() }}|"
        "{{ m.content.startswith(' ') }}|{{ m.content.endswith('!') }}|{{ m.content.replace(' ', '_') }}|"
        "{{ m.content | trim }}|{{ m.content | length }}\n{% endfor %}"
    ),
    "dict_methods": "{% for m in messages %}{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}{{ m.keys() | list }}{{ m.get('nope', 'dflt') }}\n{% endfor %}",
    "printing": "{{ none }}|{{ true }}|{{ false }}|{{ [1, 'a', none, true] }}|{{ {'k': 'v', 'n': 1.5} }}|{{ 1.0 }}|{{ 1e20 }}|{{ 0.00001 }}|{{ messages[0] }}",
    "tojson": (
        "{{ messages | tojson }}|{{ messages | tojson(indent=2) }}|{{ messages[0] | tojson(sort_keys=true) }}|"
        "{{ 'é<>&' | tojson }}|{% set v = {'z': [1.0, 0.00001, 1e16, 0.1, -2.5, 123456.789, 7, true, none], 'a': {}, "
        "'é': []} %}{{ v | tojson }}|{{ v | tojson(indent=3, sort_keys=true) }}|"
        "{{ v | tojson(ensure_ascii=true, separators=[',', ':']) }}|{{ v | tojson(indent='\t') }}"
    ),
    "undefined": "[{{ nope }}][{{ nope | length }}][{% for x in nope %}x{% endfor %}][{{ messages[0].nope }}][{{ nope is defined }}][{{ (nope or 'd') }}]",
    "namespace_loop": (
        "{% set ns = namespace(n=0, last='') %}{% for m in messages %}{% if loop.first %}F{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% set ns.last = m.role %}{{ loop.index }}/{{ loop.length }}"
        "{% if loop.last %}L{% endif %}{% endfor %}{{ ns.n }}{{ ns.last }}"
    ),
    "loop_controls": "{% for m in messages %}{% if loop.index == 2 %}{% continue %}{% endif %}{{ m.role }}{% if loop.index == 3 %}{% break %}{% endif %}{% endfor %}",
    "slices_filters": (
        "{{ messages[1:] | map(attribute='role') | join(',') }}|{{ messages[-1].role }}|"
        "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|"
        "{{ messages | rejectattr('role', 'equalto', 'user') | map(attribute='role') | first }}|"
        "{{ (messages | last).content | default('x') }}|{{ 'a' ~ 1 ~ 'b' }}|{{ 'abc'[::-1] }}|{{ range(3) | list }}"
    ),
    "in_and_tests": "{% for m in messages %}{{ 'content' in m }}{{ m.content is string }}{{ m.content is mapping }}{{ 'x' in m.content }}{% endfor %}",
    "macros": "{% macro fmt(m) %}<{{ m.role }}:{{ m.content | trim }}>{% endmacro %}{% for m in messages %}{{ fmt(m) }}{% endfor %}",
    "set_block": "{% set sys %}{{ messages[0].content }} +{% endset %}{{ sys | trim }}|{{ bos_token }}{{ eos_token }}",
    "image_parts": (
        "{% for m in messages %}{% if m.content is string %}S:{{ m.content }}{% else %}"
        "{% for p in m.content %}{{ p.type }}{% if p.text is defined %}={{ p.text }}{% endif %},{% endfor %}"
        "{% endif %}{% endfor %}"
    ),
}

FEATURE_CHATS = [
    [
        {"role": "system", "content": "  Hello world!?  "},
        {"role": "user", "content": "\x1c\tsplit  me\x1f here x\u3000"},
        {"role": "assistant", "content": "ÉCOLE straße İx"},
        {"role": "user", "content": ""},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": " hi "}, {"type": "image"}]},
        {"role": "assistant", "content": "b"},
    ],
]


@pytest.mark.parametrize("name", sorted(FEATURE_TEMPLATES))
def test_jinja_features_match_transformers(tiny_tokenizer_json, name, tmp_path):
    template = FEATURE_TEMPLATES[name]
    tok = hf_tokenizer(tiny_tokenizer_json, template)
    got = render_with_rust(tiny_tokenizer_json, template, FEATURE_CHATS, True, tmp_path)
    mismatches = []
    for chat, out in zip(FEATURE_CHATS, got, strict=True):
        want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        if out["text"] != want:
            mismatches.append((out["text"], want))
    report(f"jinja feature {name}", mismatches, len(FEATURE_CHATS), show=2)
    assert not mismatches


def test_strftime_now(tiny_tokenizer_json, tmp_path):
    """strftime_now formats the local time, as Python's `datetime.now().strftime` (chrono in Rust)."""
    from datetime import datetime

    fmt = "%d %b %Y|%A %B %j %y|%-d|%H:%M"
    template = "{{ strftime_now('" + fmt + "') }}"
    before = datetime.now().strftime(fmt)
    got = render_with_rust(tiny_tokenizer_json, template, [[{"role": "user", "content": "x"}]], True, tmp_path)
    after = datetime.now().strftime(fmt)
    assert got[0]["text"] in {before, after}


def test_the_shared_llava_template_is_the_one_test_models_ship() -> None:
    from llama3v_export.tiny import CHAT_TEMPLATE

    assert LLAVA_TEMPLATE == CHAT_TEMPLATE
