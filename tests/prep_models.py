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
    initializers = [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
                    numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
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
