"""lorakit: LoRA and adapter training for image diffusion models, compatible with sd-scripts."""

__version__ = "0.1.0"
