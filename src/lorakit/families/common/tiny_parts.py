"""Pieces the families' tiny test models share (test fixtures only: production code never imports this)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from transformers import T5Tokenizer

TINY_T5_MAX_LENGTH = 32
T5_TOKENIZER_ASSET = resources.files("lorakit") / "assets" / "t5_tokenizer"


def bundled_tiny_t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """The small (1,000-piece) Unigram tokenizer lorakit ships for its tiny test models; not the real T5's."""
    return T5Tokenizer.from_pretrained(str(T5_TOKENIZER_ASSET), model_max_length=max_length, local_files_only=True)


def tiny_vae_config() -> dict[str, Any]:
    """Four levels (three downsamplings), so 64 px -> 8x8 latents like the real SD VAE."""
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


# The special tokens the Qwen chat templates use (Qwen2.5-VL adds the vision markers).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
# Qwen3's chat template, reduced to what the image pipelines use: one user turn and the assistant's opening
# (with thinking on, nothing is added after it, as in the real template).
TINY_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_QWEN_TRAINING_TEXT = (
    "a photo of sks toy", "Describe the image by detailing the color, shape, size, texture, quantity, text",
    "spatial relationships of the objects and background", "explain how the user's text instruction should alter",
)


def tiny_qwen_tokenizer(chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer of about 400 pieces with the Qwen special tokens, trained in milliseconds: the
    real Qwen vocabulary is not available offline. Tiny Qwen models are sized to its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    model.train_from_iterator(list(_QWEN_TRAINING_TEXT), trainer)
    tokenizer = Qwen2Tokenizer(tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, bos_token=None)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_qwen_image_processor() -> Any:
    """Qwen2.5-VL's image processor (14-px patches merged 2×2), bounded so 64-px test images stay small."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
