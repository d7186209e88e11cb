"""The model's shapes and the checkpoint files around its weights (the layout `llama3v-export` reads)."""

from __future__ import annotations

from llama3v_export.tiny import CHAT_TEMPLATE, siglip_image_processor
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from .tokenizer import BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, IMAGE_TOKEN, build_tokenizer

IMAGE_SIZE = 64
# Patch 8: a 8x8 grid of 64 image tokens. With patch 16 (16 tokens) the tower separated the shapes poorly.
PATCH_SIZE = 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
MAX_CONTEXT = 512


def processor() -> LlavaProcessor:
    """Tokenizer + SigLIP image processor (PIL backend: bicubic resize to 64x64 from any size) + chat template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), bos_token=BOS_TOKEN, eos_token=EOT_TOKEN, pad_token=EOS_TOKEN
    )
    image_processor = siglip_image_processor(IMAGE_SIZE)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def stop_ids(proc: LlavaProcessor) -> list[int]:
    tok = proc.tokenizer
    return [tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(EOT_TOKEN)]


def llava_config(proc: LlavaProcessor) -> LlavaConfig:
    tok = proc.tokenizer
    vision = SiglipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        vision_use_head=False,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=MAX_CONTEXT,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=stop_ids(proc),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=TOKENS_PER_IMAGE,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        # The tower is trained for this task, so its last layer is the one to read.
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def generation_config(proc: LlavaProcessor) -> GenerationConfig:
    """Greedy by default: the task has one right answer."""
    tok = proc.tokenizer
    return GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=stop_ids(proc),
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
