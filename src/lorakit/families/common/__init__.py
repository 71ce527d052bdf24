"""Helpers shared by the model families: checkpoint reading/writing, module building and bundled tokenizers."""
