"""WD14-style tagger models: where their files live, fetching them, preprocessing and running them with
onnxruntime (sd-scripts `finetune/tag_images_by_wd14_tagger.py`, inventory §1.3).

Two layouts, as in sd-scripts:

* `--repo_id owner/name` (SmilingWolf's WD14 v2/v3 taggers): `model.onnx` + `selected_tags.csv` in
  `<model_dir>/owner_name/`; NHWC float32 input, 0-255, BGR; outputs are probabilities, one per CSV row.
* `--repo_id owner/name/subdir` (taggers published with a `tag_mapping.json`): `model_optimized.onnx` +
  `tag_mapping.json` in `<model_dir>/owner_name/subdir/`; NCHW input scaled to [-1, 1]; outputs are logits.

Both are preprocessed the way the WD14 models were trained: transparency composited on white, RGB -> BGR,
padded to a square with white (centred), resized to the model's input size (read from the ONNX input shape;
448 for the published models) with area averaging when shrinking and Lanczos when enlarging.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit.errors import DataError

logger = logging.getLogger("lorakit.prep")

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
DEFAULT_MODEL_DIR = "wd14_tagger_model"
DEFAULT_INPUT_SIZE = 448


@dataclass(frozen=True)
class TaggerFiles:
    """The files one tagger needs, and where they are (or would be downloaded to)."""

    folder: Path
    model: Path
    labels: Path
    repo_id: str
    subfolder: str | None
    download_folder: Path  # hf_hub_download's local_dir: the subfolder is created below it

    @property
    def uses_tag_mapping(self) -> bool:
        return self.labels.name == "tag_mapping.json"

    def missing(self) -> list[Path]:
        return [path for path in (self.model, self.labels) if not path.is_file()]


def locate_model(model_dir: str | Path, repo_id: str) -> TaggerFiles:
    """Where sd-scripts keeps `repo_id` under `model_dir`; a `model_dir` that itself holds the files also works."""
    parts = repo_id.split("/")
    hub_repo = "/".join(parts[:2])
    subfolder = "/".join(parts[2:]) or None
    hub_folder = Path(model_dir) / hub_repo.replace("/", "_")
    folder = hub_folder / subfolder if subfolder else hub_folder
    model_name, labels_name = ("model_optimized.onnx", "tag_mapping.json") if subfolder else ("model.onnx", "selected_tags.csv")
    direct = Path(model_dir)
    if not (folder / model_name).is_file() and (direct / model_name).is_file() and (direct / labels_name).is_file():
        folder = direct
    return TaggerFiles(folder, folder / model_name, folder / labels_name, hub_repo, subfolder, hub_folder)


def hub_reachable() -> bool:
    """False when the user switched the hub off (HF_HUB_OFFLINE) or huggingface_hub is not installed."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def missing_model_message(files: TaggerFiles) -> str:
    names = " and ".join(path.name for path in (files.model, files.labels))
    source = f"the Hugging Face repository {files.repo_id}" + (f" (folder {files.subfolder})" if files.subfolder else "")
    return (f"--model_dir: no tagger model in {files.folder}; put {names} from {source} in that folder "
            f"(or give --model_dir the folder that holds them, or run with internet access to download them)")


def download_model(files: TaggerFiles) -> None:
    """Fetch the two files with huggingface_hub (imported here: only users with internet access need it)."""
    from huggingface_hub import hf_hub_download

    files.download_folder.mkdir(parents=True, exist_ok=True)
    for path in (files.model, files.labels):
        logger.info("downloading %s from %s", path.name, files.repo_id)
        try:
            hf_hub_download(repo_id=files.repo_id, filename=path.name, subfolder=files.subfolder,
                            local_dir=files.download_folder, force_download=True)
        except Exception as err:  # noqa: BLE001 - any network or hub failure ends in the same advice
            raise DataError(f"downloading {path.name} from {files.repo_id} failed ({err.__class__.__name__}: "
                            f"{err}); {missing_model_message(files)}") from None


# ---------------------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------------------


def on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (what the taggers saw in training)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def pad_to_square(pixels: np.ndarray, fill: int = 255) -> np.ndarray:
    """Pad an HxWxC array to a square, centred (the extra pixel of an odd pad goes to the bottom/right)."""
    height, width = pixels.shape[:2]
    size = max(height, width)
    top, left = (size - height) // 2, (size - width) // 2
    pads = ((top, size - height - top), (left, size - width - left), (0, 0))
    return np.pad(pixels, pads, mode="constant", constant_values=fill)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """One image as the WD14 models expect it: size x size x 3, BGR, float32 0-255, padded with white."""
    from lorakit.data.images import resize_to

    square = pad_to_square(np.asarray(on_white(image)))
    resized = resize_to(Image.fromarray(square), (size, size))
    return np.asarray(resized, dtype=np.float32)[:, :, ::-1].copy()


def load_for_tagging(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(preprocessed pixels, (width, height) as the trainer sees the image: after EXIF rotation)."""
    from lorakit.data.images import load_image_and_alpha

    rgb, alpha = load_image_and_alpha(path)
    if alpha is not None:
        rgb.putalpha(alpha)
    return preprocess(rgb, size), rgb.size


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------


def _dimension(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


class TaggerModel:
    """An onnxruntime session over a tagger's ONNX file, with the input layout and size it declares."""

    def __init__(self, files: TaggerFiles):
        import onnxruntime as ort

        preferred = ("CUDAExecutionProvider", "ROCMExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in preferred if p in ort.get_available_providers()] or None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: graph-optimisation notices are not the user's concern
        try:
            self.session = ort.InferenceSession(str(files.model), sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise DataError(f"tagger model {files.model} cannot be loaded by onnxruntime: {err}") from None
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = list(model_input.shape)
        if len(shape) != 4:
            raise DataError(f"tagger model {files.model}: expected an image input of 4 dimensions, found {shape}")
        self.channels_first = files.uses_tag_mapping or _dimension(shape[1]) == 3
        self.input_size = _dimension(shape[2] if self.channels_first else shape[1]) or DEFAULT_INPUT_SIZE
        self.fixed_batch = _dimension(shape[0])
        self.outputs_logits = files.uses_tag_mapping
        self.output_count = self.session.get_outputs()[0].shape[-1]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Per-label probabilities for a (N, size, size, 3) BGR 0-255 batch."""
        if self.channels_first:
            batch = batch.transpose(0, 3, 1, 2) / 127.5 - 1.0
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        outputs = np.asarray(outputs, dtype=np.float64)[: len(batch)]
        return 1.0 / (1.0 + np.exp(-outputs)) if self.outputs_logits else outputs
