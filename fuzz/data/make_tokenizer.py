"""Writes data/tokenizer.json: a small byte-level BPE for the detokenization fuzz target.

Byte-level pre-tokenizer and decoder as in Llama-3's tokenizer.json, a 512-token vocabulary trained on a
few lines of multilingual text and emoji (so merges split multi-byte characters in awkward places), and
special tokens. Run once: `.venv/bin/python fuzz/data/make_tokenizer.py`.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = [
    "The quick brown fox jumps over the lazy dog. What is in this image?",
    "Ceci n'est pas une pipe. Größe, Straße, naïve café, déjà vu.",
    "你好，世界。这是一只猫。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Emoji: 😀😃😄 👩‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 and ZWJ sequences.",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\t\r\n",
]


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<image>"],
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    out = Path(__file__).with_name("tokenizer.json")
    tok.save(str(out))
    print(f"{out}: vocabulary {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
