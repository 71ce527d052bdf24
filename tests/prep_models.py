"""Tiny models with the real interfaces of the preparation tools, built offline in a few seconds.

* a WD14-style ONNX tagger: NHWC float input, one probability per tag, probabilities a known linear function
  of the image's mean BGR colour (so a pure-colour image has a chosen probability vector), plus its
  `selected_tags.csv`;
* BLIP, GIT and Qwen2.5-VL captioners from their transformers config classes with random weights, saved with
  a tokenizer and image processor that load from the folder alone.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# (name, category number) of the tiny tagger's outputs, in output order; ratings first as in the WD14 CSVs.
TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("1girl", 0), ("long_hair", 0), ("smile", 0), ("^_^", 0), ("red_theme", 0), ("outdoors", 0),
    ("alice_(wonderland)", 4), ("bob", 4), ("signature", 5),
]
# Probabilities of each tag for a pure red, green and blue image (the model maps mean colour linearly).
PROBS = {
    "red":   [0.1, 0.7, 0.1, 0.1, 0.9, 0.5, 0.3, 0.6, 0.8, 0.36, 0.6, 0.2, 0.5],
    "green": [0.6, 0.2, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1],
    "blue":  [0.8, 0.1, 0.05, 0.05, 0.2, 0.9, 0.1, 0.1, 0.1, 0.1, 0.4, 0.95, 0.1],
}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_tagger(folder: Path, size: int = 32, batch: int | str = "N", layout: str = "csv") -> Path:
    """model.onnx + selected_tags.csv in `folder` (or model_optimized.onnx + tag_mapping.json, NCHW logits)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    # weights[c] = probabilities of a pure image of BGR channel c; the input is the mean colour / 255
    weights = np.array([PROBS["blue"], PROBS["green"], PROBS["red"]], dtype=np.float32)
    channels_first = layout == "mapping"
    if channels_first:  # NCHW in [-1, 1] -> back to [0, 1], and logits out
        weights = np.log(weights / (1 - weights)).astype(np.float32)
    shape = [batch, 3, size, size] if channels_first else [batch, size, size, 3]
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[2, 3] if channels_first else [1, 2], keepdims=0),
        helper.make_node("Add", ["mean", "one"], ["shifted"]) if channels_first else helper.make_node("Div", ["mean", "c255"], ["scaled"]),
    ]
    if channels_first:
        nodes.append(helper.make_node("Div", ["shifted", "two"], ["scaled"]))
    nodes.append(helper.make_node("MatMul", ["scaled", "weights"], ["predictions_sigmoid"]))
    constants = {"c255": 255.0} if not channels_first else {"one": 1.0, "two": 2.0}
    initializers = [numpy_helper.from_array(weights, "weights"),
                    *(numpy_helper.from_array(np.array(value, np.float32), name) for name, value in constants.items())]
    graph = helper.make_graph(
        nodes, "tiny_tagger", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGS)])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if channels_first:
        onnx.save(model, folder / "model_optimized.onnx")
        names = {0: "General", 4: "Character", 5: "Meta", 9: "Rating"}
        import json

        mapping = {str(i): {"tag": name, "category": names[cat]} for i, (name, cat) in enumerate(TAGS)}
        (folder / "tag_mapping.json").write_text(json.dumps(mapping), encoding="utf-8")
        return folder
    onnx.save(model, folder / "model.onnx")
    with (folder / "selected_tags.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category) in enumerate(TAGS):
            writer.writerow([1000 + index, name, category, 100])
    return folder


def write_colour_image(path: Path, colour: str, size: tuple[int, int] = (24, 24)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# captioners
# ---------------------------------------------------------------------------------------------------------

WORDS = "a picture of red green blue circle square triangle on white black background with the and".split()
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=8)


def _bert_tokenizer(folder: Path, extra: list[str] = ()):
    """A WordPiece tokenizer over a vocabulary of a few words and letters (BLIP and GIT use BERT's)."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra, *WORDS, *LETTERS, *(f"##{c}" for c in LETTERS)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


def write_blip(folder: Path) -> Path:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = _bert_tokenizer(folder, extra=["[DEC]"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=96, pad_token_id=0,
                bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=TINY_VISION, text_config=text, projection_dim=32))
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_git(folder: Path) -> Path:
    import torch
    from transformers import GitConfig, GitForCausalLM, GitProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _bert_tokenizer(folder)
    config = GitConfig(vision_config=TINY_VISION, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=96, pad_token_id=0,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    GitForCausalLM(config).save_pretrained(folder)
    processor = GitProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                             tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
# The shape of Qwen2-VL's chat template for one user turn with images and text.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer():
    """A byte-level BPE tokenizer (Qwen2's kind) trained here on a few sentences, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=QWEN_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS), "describe this image user assistant system"], trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


def write_qwen_vl(folder: Path, version: str = "qwen2_5_vl") -> Path:
    """A Qwen2.5-VL (or Qwen2-VL) of 1 text and 1 vision layer, width 32, with its tokenizer and image processor."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start", "vision_end")}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})
    if version == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                          video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                          vision_end_token_id=ids["vision_end"], eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(folder)
    return folder
