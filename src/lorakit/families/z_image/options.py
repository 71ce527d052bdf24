"""Z-Image's options (musubi-tuner's `zimage_train_network.py`): the Qwen3 text-encoder file, `--text_encoder`."""

from __future__ import annotations

from lorakit.families.common.llm_options import LanguageModelEncoderOptions

OPTIONS = LanguageModelEncoderOptions
