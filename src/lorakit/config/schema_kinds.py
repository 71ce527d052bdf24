"""Option sections of the training types beside LoRA: textual inversion and ControlNet (sd-scripts' names).

`lorakit textual-inversion` takes `train_textual_inversion.py`'s own options, `lorakit controlnet` those of
`train_control_net.py`, `sdxl_train_control_net_lllite.py` and `flux_train_control_net.py`; the dataset, optimizer,
saving and sampling options are the ones every command shares. Each training type refuses the other types'
options (`training/kinds.py`), so an option never silently does nothing.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from lorakit.config.schema_data import OptionSection


class TextualInversionOptions(OptionSection):
    SECTION: ClassVar[str] = "textual_inversion"

    token_string: str | None = Field(None, description="the new token (must not be in the tokenizer yet); "
                                     "its vectors are TOKEN, TOKEN1, TOKEN2, ...")
    init_word: str | None = Field(None, description="word(s) whose embeddings start the new vectors")
    num_vectors_per_token: int = Field(1, ge=1, description="vectors the token stands for")
    use_object_template: bool = Field(False, description="ignore captions; train on 'a photo of a TOKEN' templates")
    use_style_template: bool = Field(False, description="ignore captions; train on 'a painting in the style of "
                                     "TOKEN' templates")
    weights: str | None = Field(None, description="embedding file to continue training from")


class ControlNetOptions(OptionSection):
    SECTION: ClassVar[str] = "controlnet"

    lllite: bool = Field(False, description="[SDXL] train a ControlNet-LLLite (the SDXL default)")
    cond_emb_dim: int | None = Field(None, ge=1, description="[LLLite] conditioning embedding channels (default 32)")
