"""A small byte-level BPE trained on the task's text, with the Llama-3 special tokens the chat template uses.

Byte-level like Llama-3's own tokenizer, so any text (including prompts outside the task) encodes; the special
tokens come after the learned vocabulary, `<image>` last, as in the real checkpoints' layout.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .shapes import BACKGROUNDS, COLORS, PARAPHRASES, QUESTIONS, SHAPES, answer

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, "<|start_header_id|>", "<|end_header_id|>", EOT_TOKEN, IMAGE_TOKEN)
# The MiniCPM-Llama3-V 2.5 layout's prompt tokens besides <image>: the image end, the slice grid's brackets and the
# <unk> placeholder rows that the resampler's features replace.
MINICPMV_SPECIAL_TOKENS = (*SPECIAL_TOKENS, "</image>", "<slice>", "</slice>", "<unk>")
# Learned merges on top of the 256 byte tokens: enough for every task word to be one token.
BPE_VOCAB_SIZE = 384
# Llama-3's pre-tokenization split pattern, so words split as the real tokenizer splits them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def task_texts() -> list[str]:
    """Every question, answer and chat-role word of the task, several times over so the merges cover them."""
    texts = ["user", "assistant", "system", "\n\n"] * 50
    texts += list(QUESTIONS.values()) + [p for ps in PARAPHRASES.values() for p in ps]
    for shape in SHAPES:
        for color in COLORS:
            for background in BACKGROUNDS:
                texts += [answer(kind, shape, color, background) for kind in QUESTIONS]
    return texts * 4


def build_tokenizer(special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
    """The task's BPE (the same merges for every layout), then `special_tokens` after the learned vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(task_texts(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens])
    return tokenizer
