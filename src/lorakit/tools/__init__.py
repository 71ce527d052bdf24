"""Offline LoRA tools (resize, merge, extract, convert, inspect): pure functions over state dicts.

The math is the adapters' (`lorakit.adapters.lora.lora_delta_weight`); the key naming of each model family
lives in `layouts.py`; `lorakit.cli.lora` is the thin command line over them.
"""
