"""SD3's text conditioning from the encoders' outputs, and the positional-embedding crop (pure functions).

The text tokens are CLIP-L's and CLIP-G's penultimate hidden states, concatenated (768 + 1280 wide), padded with
zeros to T5's width and followed by T5-XXL's last hidden states; the global vector is both CLIPs' projected
pooled outputs, concatenated. `--clip_l/clip_g/t5_dropout_rate` zero one encoder's part per sample.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.transfer import to_device

CLIP_MAX_LENGTH = 77


#: what sd-scripts assumes when splitting CLIP-L's part off the concatenated outputs (files without our width key)
CLIP_L_WIDTH = 768
WIDTH_KEY = "lorakit_clip_l_width"  # CLIP-L's (hidden, pooled) widths in `lg_out` / `lg_pooled` (tiny models differ)


def clip_outputs(encoder: torch.nn.Module, tokenizer: Any, captions: list[str], use_mask: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Penultimate hidden states, the projected pooled output and the token mask. Under the mask option the
    encoder does not attend to padding; the padded outputs are zeroed later (`split_outputs`), so the stored
    outputs are sd-scripts' (which keeps them as they come)."""
    tokens = tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
    ids, mask = to_device(tokens.input_ids, encoder.device), to_device(tokens.attention_mask, encoder.device)
    out = encoder(ids, attention_mask=mask if use_mask else None, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds, mask


def split_outputs(outputs: dict[str, torch.Tensor], apply_lg_attn_mask: bool, apply_t5_attn_mask: bool
                  ) -> dict[str, torch.Tensor]:
    """sd-scripts' `lg_out`, `lg_pooled`, `t5_out` and masks -> each encoder's part, padding zeroed under the mask
    options (what `assemble_conditioning` takes)."""
    lg, lg_pooled, t5 = outputs["lg_out"], outputs["lg_pooled"], outputs["t5_out"]
    widths = outputs.get(WIDTH_KEY)
    hidden_l, pooled_l = (int(w) for w in widths.reshape(-1, 2)[0]) if widths is not None else (CLIP_L_WIDTH, CLIP_L_WIDTH)
    l, g = lg[..., :hidden_l], lg[..., hidden_l:]
    if apply_lg_attn_mask:
        l, g = _masked(l, outputs["clip_l_attn_mask"]), _masked(g, outputs["clip_g_attn_mask"])
    if apply_t5_attn_mask:
        t5 = _masked(t5, outputs["t5_attn_mask"])
    return {"l": l, "g": g, "l_pooled": lg_pooled[..., :pooled_l], "g_pooled": lg_pooled[..., pooled_l:], "t5": t5}


def _masked(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden * mask.to(device=hidden.device, dtype=hidden.dtype)[..., None]


def assemble_conditioning(parts: dict[str, torch.Tensor], dropout_rates: tuple[float, float, float], training: bool) -> dict[str, torch.Tensor]:
    """SD3's context [CLIP-L‖CLIP-G zero-padded to T5 width ; T5] and pooled [L ; G], with per-encoder dropout.

    Dropout zeroes one encoder's hidden states and pooled vector for a sample with its rate (sd-scripts'
    `--clip_l_dropout_rate` …), so the model also learns the unconditional parts it is sampled with.
    """
    l, g, t5 = parts["l"], parts["g"], parts["t5"]
    l_pooled, g_pooled = parts["l_pooled"], parts["g_pooled"]
    if training:
        keep_l, keep_g, keep_t5 = (_keep_mask(rate, l.shape[0], l.device) for rate in dropout_rates)
        l, l_pooled = _apply(keep_l, l), _apply(keep_l, l_pooled)
        g, g_pooled = _apply(keep_g, g), _apply(keep_g, g_pooled)
        t5 = _apply(keep_t5, t5)
    clip = torch.cat([l, g.to(l.dtype)], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    context = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
    return {"context": context, "pooled": torch.cat([l_pooled, g_pooled.to(l_pooled.dtype)], dim=-1)}


def _keep_mask(rate: float, count: int, device: torch.device) -> torch.Tensor | None:
    if rate <= 0:
        return None
    return (torch.rand(count, device=device) >= rate).float()


def _apply(keep: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor:
    if keep is None:
        return tensor
    return tensor * keep.to(tensor.dtype).view((-1,) + (1,) * (tensor.ndim - 1))


class random_position_crop:
    """`--pos_emb_random_crop_rate`: with that probability, the positional-embedding window is taken at a random
    place of the max-size grid instead of its centre (SD3.5 Medium was trained so; it helps other resolutions).

    diffusers' PatchEmbed crops the centre; for one call its `cropped_pos_embed` is replaced by a random crop, of
    the scaled table for the latent's size under `--enable_scaled_pos_embed` (as sd-scripts), else of the fixed one.
    """

    def __init__(self, transformer: torch.nn.Module, rate: float):
        self.embed = transformer.pos_embed
        self.scaled = getattr(self.embed, "scaled_pos_embeds", None)
        croppable = self.scaled is not None or getattr(self.embed, "pos_embed_max_size", None)
        self.active = rate > 0 and croppable and bool(torch.rand(()) < rate)
        self.previous = None

    def __enter__(self) -> None:
        if not self.active:
            return
        embed, size, scaled = self.embed, self.embed.pos_embed_max_size, self.scaled
        self.previous = embed.__dict__.get("cropped_pos_embed")

        def cropped(height: int, width: int) -> torch.Tensor:
            if scaled is not None:
                return scaled.window(height, width, random_crop=True, device=embed.proj.weight.device)
            h, w = height // embed.patch_size, width // embed.patch_size
            top = int(torch.randint(0, size - h + 1, ()))
            left = int(torch.randint(0, size - w + 1, ()))
            grid = embed.pos_embed.reshape(1, size, size, -1)[:, top:top + h, left:left + w, :]
            return grid.reshape(1, -1, grid.shape[-1])

        embed.cropped_pos_embed = cropped

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        if self.previous is not None:
            self.embed.cropped_pos_embed = self.previous  # the scaled tables' centre window
        else:
            del self.embed.cropped_pos_embed


