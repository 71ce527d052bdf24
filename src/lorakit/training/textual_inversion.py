"""Textual inversion (`lorakit textual-inversion`, sd-scripts' `train_textual_inversion.py` and its SDXL twin).

A new token (`--token_string`, standing for `--num_vectors_per_token` vectors spelled `TOKEN TOKEN1 TOKEN2 ...`)
is added to every text encoder the family names in `textual_inversion_keys`, and only its vectors train.

The vectors live outside the embedding table: hooks on each encoder's token embedding make the new ids read the
trained vectors and every other id read the untouched table. So no other row can change (sd-scripts trains
the whole table and copies the old rows back after each step; the result is the same, with no optimizer state for
the rest of the table and nothing to restore). The file is sd-scripts': one tensor per encoder under the family's
key (`emb_params`; `clip_l` and `clip_g`), with ModelSpec `.../textual-inversion` metadata only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.data.conditioning import ConditioningUse
from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import Components, ModelFamily
from lorakit.data.text_cache import caches_text
from lorakit.training.kinds import foreign_option_problems

from lorakit.training.trainable import FrozenModelTraining, TrainableDefaults

log = logging.getLogger("lorakit")

#: captions of --use_object_template / --use_style_template, `{}` being the token (lorakit's own wording)
OBJECT_TEMPLATES = (
    "a photo of a {}", "a picture of a {}", "a close-up photo of a {}", "a cropped photo of the {}",
    "a bright photo of the {}", "a dark photo of the {}", "a photo of one {}", "a good photo of a {}",
    "a photo of the small {}", "a photo of the large {}", "an image of a {}", "a rendering of the {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a picture in the style of {}", "an image in the style of {}",
    "a drawing in the style of {}", "a rendering in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a dark painting in the style of {}", "a small picture in the style of {}",
    "a large picture in the style of {}", "artwork in the style of {}", "an illustration in the style of {}",
)


def token_strings(cfg: Any) -> list[str]:
    """`TOKEN`, `TOKEN1`, ... `TOKEN{n-1}`: the words the token's vectors are added as (sd-scripts' spelling)."""
    return [cfg.token_string] + [f"{cfg.token_string}{i + 1}" for i in range(cfg.num_vectors_per_token - 1)]


class TokenVectors(nn.Module):
    """The trained vectors: one (num_vectors, width) parameter per text encoder."""

    def __init__(self, rows: list[torch.Tensor]):
        super().__init__()
        self.rows = nn.ParameterList([nn.Parameter(row) for row in rows])


class NewTokenHooks:
    """Hooks on a token embedding: ids from `first_id` on read the trained vectors, the rest the table.

    Hooks rather than a wrapping module, so the encoder keeps its structure and its state-dict names. The ids are
    clamped into the table before the lookup (the new ids may lie past its end) and put back after it.
    """

    def __init__(self, table: nn.Embedding, owner: TokenVectors, index: int, first_id: int):
        self.owner, self.index, self.first_id = owner, index, first_id
        self._ids: list[torch.Tensor] = []
        self.handles = [table.register_forward_pre_hook(self._clamp), table.register_forward_hook(self._replace)]

    def _clamp(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        ids = inputs[0]
        self._ids.append(ids)
        return (ids.clamp(max=self.first_id - 1), *inputs[1:])

    def _replace(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], known: torch.Tensor) -> torch.Tensor:
        ids = self._ids.pop()
        rows = self.owner.rows[self.index]
        new = (ids >= self.first_id).unsqueeze(-1)
        picked = rows[(ids - self.first_id).clamp(0, rows.shape[0] - 1)].to(known.dtype)
        return torch.where(new, picked, known)


class EmbeddingTrainable(TrainableDefaults):
    """New token vectors in the text encoders, as the loop trains them."""

    modelspec_kind = "textual-inversion"
    trains_text_encoders = True

    def __init__(self, module: TokenVectors, keys: tuple[str, ...], tokens: list[str]):
        self.module = module
        self.keys, self.tokens = keys, tokens

    def parameter_groups(self, cfg: Any) -> tuple[list[dict[str, Any]], list[str]]:
        return [{"params": list(self.module.parameters()), "lr": cfg.learning_rate}], ["textual_inversion"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def after_optimizer_step(self, cfg: Any) -> dict[str, float]:
        return {}

    def metadata(self, cfg: Any) -> dict[str, str]:
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        """The file's tensors: each encoder's vectors under the family's key."""
        return {key: row.detach() for key, row in zip(self.keys, self.module.rows)}

    def save(self, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None, model_format: str) -> None:
        """sd-scripts' embedding file; like sd-scripts it carries the ModelSpec metadata only."""
        spec = {key: value for key, value in metadata.items() if key.startswith("modelspec.")}
        save_lora_file(self.state(), path, spec, save_dtype=save_dtype, model_format=model_format)

    def sample_pipeline(self, family: ModelFamily, comps: Components, sampler: str) -> Any:
        return family.pipeline(comps, sampler)

    def sample_inputs(self, prompt: Any) -> tuple[Any, dict[str, Any]]:
        """Prompts name the token once; with several vectors it is spelled out, as in sd-scripts."""
        from dataclasses import replace

        if len(self.tokens) == 1:
            return prompt, {}
        spelled = " ".join(self.tokens)
        return replace(prompt, prompt=prompt.prompt.replace(self.tokens[0], spelled),
                       negative_prompt=prompt.negative_prompt.replace(self.tokens[0], spelled)), {}


class TextualInversionTraining(FrozenModelTraining):
    """`lorakit textual-inversion`: new token vectors for the families that name their embedding keys."""

    title = "textual inversion"
    conditioning = ConditioningUse.MASK

    def option_problems(self, cfg: Any, family: ModelFamily) -> list[str]:
        """The checks; also names the output after the token when --output_name is not given (as sd-scripts)."""
        problems = foreign_option_problems(cfg, "textual-inversion")
        if cfg.output_name is None and cfg.token_string:
            cfg.output_name = cfg.token_string
        if not family.textual_inversion_keys:
            problems.append(f"textual inversion is not available for the {family.title} family")
        if not cfg.token_string:
            problems.append("--token_string is required: the new token the embedding is trained for")
        elif any(ch.isspace() for ch in cfg.token_string):
            problems.append(f"--token_string {cfg.token_string!r} must be one word (no spaces)")
        if caches_text(cfg):
            problems.append("--cache_text_encoder_outputs cannot be used with textual inversion: the text encoders "
                            "compute the new token's vectors every step")
        if cfg.weights and not Path(cfg.weights).is_file():
            problems.append(f"--weights {cfg.weights} does not exist")
        return problems

    def prepare_dataset(self, cfg: Any, dataset: Any) -> None:
        """Template captions (--use_object_template / --use_style_template) and the spelled-out token."""
        if not cfg.token_string:
            return  # reported by option_problems
        spelled = " ".join(token_strings(cfg))
        if cfg.use_object_template or cfg.use_style_template:
            templates = OBJECT_TEMPLATES if cfg.use_object_template else STYLE_TEMPLATES
            dataset.add_replacement("", [template.format(spelled) for template in templates])
        elif cfg.num_vectors_per_token > 1:
            dataset.add_replacement(cfg.token_string, spelled)

    def build(self, cfg: Any, spec: Any, family: ModelFamily, comps: Components, device: torch.device
              ) -> EmbeddingTrainable:
        tokens = token_strings(cfg)
        keys = family.textual_inversion_keys
        loaded = _read_weights(cfg.weights, keys, len(tokens)) if cfg.weights else None
        starts = [_add_tokens(comps, index, tokens, cfg.init_word) for index in range(len(keys))]
        rows = [loaded[i] if loaded is not None else start for i, (_, start) in enumerate(starts)]
        module = TokenVectors([row.float().to(device) for row in rows])
        hooks = [NewTokenHooks(comps.text_encoders[index].get_input_embeddings(), module, index, first_id)
                 for index, (first_id, _) in enumerate(starts)]
        log.info("textual inversion: %d vector(s) for %s in %d text encoder(s)", len(tokens), cfg.token_string, len(keys))
        trainable = EmbeddingTrainable(module, keys, tokens)
        trainable.hooks = hooks
        return trainable


def _add_tokens(comps: Components, index: int, tokens: list[str], init_word: str | None) -> tuple[int, torch.Tensor]:
    """Add the token words to one tokenizer; their first id and their starting vectors."""
    tokenizer, encoder = comps.tokenizers[index], comps.text_encoders[index]
    known = [token for token in tokens if tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id]
    if known or tokenizer.add_tokens(tokens) != len(tokens):
        raise ConfigError([f"--token_string {tokens[0]}: the tokenizer already has this word "
                           f"({', '.join(known) or 'or one of its numbered forms'}); choose another"])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = encoder.get_input_embeddings().weight.detach()
    if ids != list(range(len(tokenizer) - len(ids), len(tokenizer))):
        raise ConfigError([f"--token_string {tokens[0]}: the tokenizer gave its words ids {ids}, not the last ones"])
    if not init_word:
        return ids[0], torch.randn(len(tokens), table.shape[1], dtype=torch.float32) * 0.02
    init_ids = tokenizer.encode(init_word, add_special_tokens=False)
    if len(init_ids) > 1 and len(init_ids) != len(tokens):
        log.warning("--init_word %r is %d tokens for %d vectors; its tokens are repeated or cut", init_word,
                    len(init_ids), len(tokens))
    return ids[0], torch.stack([table[init_ids[i % len(init_ids)]].float().cpu() for i in range(len(tokens))])


def _read_weights(path: str, keys: tuple[str, ...], count: int) -> list[torch.Tensor]:
    """--weights: an embedding file of this family (its keys), or any file of one tensor (A1111 style)."""
    state, _ = load_lora_file(path)
    if all(key in state for key in keys):
        tensors = [state[key] for key in keys]
    elif len(state) == 1 and len(keys) == 1:
        tensors = list(state.values())
    else:
        raise CheckpointError(f"--weights {path} holds {', '.join(sorted(state))}; an embedding file of this model "
                              f"holds {', '.join(keys)}")
    tensors = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    if any(t.shape[0] != count for t in tensors):
        raise CheckpointError(f"--weights {path} has {tensors[0].shape[0]} vector(s) per token; "
                              f"--num_vectors_per_token is {count}")
    return [t.float() for t in tensors]


TEXTUAL_INVERSION = TextualInversionTraining()
