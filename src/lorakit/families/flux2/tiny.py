"""Tiny FLUX.2 [klein] models of the real architecture (random weights), a tiny Qwen tokenizer, and writers for both
file layouts. Test fixtures only (production code never imports this).

The transformer has 1 double and 2 single blocks (head width 16 = RoPE axes 4×4), the autoencoder FLUX.2's shape
at 4 levels with 8 latent channels (64 px -> 8x8 latents, 4x4 tokens) and non-trivial BatchNorm statistics, Qwen3
has FLUX.2's 28+ layers (it reads layers 9, 18, 27) at width 16. The tokenizer is a byte-level BPE over the 256
bytes with Qwen's special tokens and a chat template that renders as Qwen3's does without thinking, built here
(the real Qwen3 tokenizer cannot be fetched offline).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.base import Components
from lorakit.families.common.bfl_parts import configs_metadata
from lorakit.families.common.ldm_keys import vae_to_ldm
from lorakit.families.flux2 import bfl_keys
from lorakit.families.flux2.loading import flow_scheduler

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
)
TINY_AE = dict(
    block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=8, sample_size=64,
)
TINY_QWEN3 = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    max_position_embeddings=512, tie_word_embeddings=True,
)
TOKENIZER_LENGTH = 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tiny_tokenizer():
    """A Qwen2 (fast) tokenizer: byte-level BPE without merges, Qwen's special tokens, Qwen3's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                              bos_token=None, additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
                              model_max_length=TOKENIZER_LENGTH, chat_template=CHAT_TEMPLATE)


def build_tiny_flux2(seed: int = 0) -> Components:
    """Random tiny FLUX.2 [klein] components (eval mode)."""
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKLFlux2(**TINY_AE)
    with torch.no_grad():  # statistics a real autoencoder learnt: normalising must matter
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape) + 0.5)
    tokenizer = build_tiny_tokenizer()
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), **TINY_QWEN3))
    modules = [m.eval() for m in (transformer, vae, qwen)]
    return Components(modules[0], modules[1], [modules[2]], [tokenizer], {})


def save_pipeline_folder(comps: Components, folder: str | Path) -> Path:
    """A diffusers Flux2KleinPipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/)."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                              tokenizer=comps.tokenizers[0], transformer=comps.denoiser)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def save_bfl_files(comps: Components, folder: str | Path, *, comfy_prefix: bool = False, shards: int = 1) -> dict[str, Path]:
    """musubi-tuner's three files: the transformer in BFL layout, Qwen3 (in `shards` files, transformers names) with
    the tokenizer in a `tokenizer/` folder beside it, and the autoencoder in BFL layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "model.diffusion_model." if comfy_prefix else ""
    files = {"flux2": folder / "flux2.safetensors", "ae": folder / "ae.safetensors"}
    write_safetensors_atomic(bfl_keys.diffusers_to_bfl(comps.denoiser.state_dict(), prefix), files["flux2"],
                             configs_metadata("transformer", comps.denoiser.config))
    files["text_encoder"] = _save_qwen(comps.text_encoders[0], folder, shards)
    comps.tokenizers[0].save_pretrained(str(folder / "tokenizer"))
    write_safetensors_atomic(_bfl_ae_state(comps.vae), files["ae"], configs_metadata("vae", comps.vae.config))
    return files


def _save_qwen(qwen, folder: Path, shards: int) -> Path:
    state = {k: v for k, v in qwen.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    keys = sorted(state)
    names = [folder / (f"qwen3-{i:05d}-of-{shards:05d}.safetensors" if shards > 1 else "qwen3.safetensors") for i in range(1, shards + 1)]
    for index, name in enumerate(names):  # every shard carries the config; the first is read
        part = {k: state[k] for k in keys[index::shards]}
        write_safetensors_atomic(part, name, configs_metadata("text_encoder", qwen.config.to_dict()))
    return names[0]


def _bfl_ae_state(vae) -> dict[str, torch.Tensor]:
    """BFL's `ae.safetensors` layout: LDM names, the quant convs inside the encoder and decoder, `bn.*` as is."""
    state = vae_to_ldm(vae.state_dict(), dict(vae.config), prefix="")
    moved = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
    return {next((inner + k[len(top):] for top, inner in moved.items() if k.startswith(top)), k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------
# `lorakit bench`: the tiny model, or klein 4B's real shapes with random weights, as the original files
# ---------------------------------------------------------------------------------------------------------

REAL_BLOCKS = (5, 20)  # FLUX.2 [klein] 4B's double and single blocks


def bench_files(size: str, folder: Path, blocks: tuple[int, int] | None = None) -> tuple[list[str], list[str]]:
    """The `lorakit train` options naming the benchmark model's files (written on first use), and notes. Real sizes
    keep every shape the step touches, except Qwen3's depth (28 of 36 layers: FLUX.2 reads up to layer 27)."""
    blocks = blocks or REAL_BLOCKS
    if size == "real":
        folder = folder.with_name(f"{folder.name}_{blocks[0]}x{blocks[1]}")
    names = {"flux2": "flux2.safetensors", "text_encoder": "qwen3.safetensors", "ae": "ae.safetensors"}
    files = {key: folder / name for key, name in names.items()}
    if not all(path.exists() for path in files.values()):
        save_bfl_files(build_bench_model(size, blocks), folder)
    args = [f"--pretrained_model_name_or_path={files['flux2']}", f"--text_encoder={files['text_encoder']}", f"--vae={files['ae']}"]
    notes = [] if size == "tiny" else [f"FLUX.2 [klein] 4B transformer {blocks[0]} double + {blocks[1]} single blocks at width "
                                       "3072; Qwen3 4B with 28 of its 36 layers (outputs cached before the first step)"]
    return args, notes


def build_bench_model(size: str, blocks: tuple[int, int] = REAL_BLOCKS) -> Components:
    if size == "tiny":
        return build_tiny_flux2(seed=0)
    from lorakit.families.common.bench_files import clean_config, default_dtype
    from lorakit.families.flux2.loading import bundled_config

    comps = build_tiny_flux2(seed=0)  # for its tokenizer
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        transformer = Flux2Transformer2DModel.from_config({**bundled_config("transformer_klein_4b"), "num_layers": blocks[0],
                                                           "num_single_layers": blocks[1]})
        vae = AutoencoderKLFlux2.from_config(bundled_config("ae"))
        qwen = Qwen3ForCausalLM(Qwen3Config(**{**clean_config(bundled_config("qwen3_4b")), "num_hidden_layers": 28,
                                               "vocab_size": len(comps.tokenizers[0])}))
    comps.denoiser, comps.vae, comps.text_encoders = transformer.eval(), vae.eval(), [qwen.eval()]
    return comps
