"""Module-path segments shared by several families' LoRA key layouts (`adapters/key_layout.py`).

A kohya name is split back into a module path by matching these segments, so every compound name (`to_q`,
`down_blocks`) a model's modules have must be listed.
"""

from __future__ import annotations

#: diffusers' UNet2DConditionModel (SD 1.x/2.x, and SDXL's diffusers names)
UNET_SEGMENTS = (
    "down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "downsamplers", "upsamplers",
    "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj",
    "proj_in", "proj_out", "norm", "norm1", "norm2", "norm3", "conv", "conv1", "conv2", "conv_shortcut",
    "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2",
)
#: transformers' CLIPTextModel(WithProjection), with the `text_model` level kohya names keep
CLIP_SEGMENTS = (
    "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", "fc1",
    "fc2", "embeddings", "token_embedding", "position_embedding", "final_layer_norm", "layer_norm1",
    "layer_norm2",
)
#: transformers' T5EncoderModel
T5_SEGMENTS = ("encoder", "block", "layer", "SelfAttention", "q", "k", "v", "o", "DenseReluDense", "wi", "wi_0", "wi_1", "wo")
