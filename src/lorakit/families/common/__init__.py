"""Helpers shared by the model families: checkpoint reading/writing and bundled tokenizers."""
