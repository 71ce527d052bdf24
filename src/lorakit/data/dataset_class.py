"""`--dataset_class module.Class`: training examples produced by a Python class of the user's own.

sd-scripts imports the named class and trains on the batches it returns. lorakit imports it the same way (an
installed module, or a `module.py` / `module/` folder in the working directory, as for custom optimizers: it is
code the user names on the command line, never something read from a data file) and asks it for examples, not
batches, so buckets, the latent and text-encoder caches, repeats and every caption option work on them as on an
image folder. The protocol:

* the class is built with one argument, the parsed options (attributes named as sd-scripts' options:
  `options.resolution`, `options.train_data_dir`, ...);
* `len(dataset)` is the number of examples and `dataset[i]` one example: a pair `(image, caption)` or a mapping
  with the keys `image` and `caption`;
* `image` is a PIL image or the path of an image file; `caption` is text.

Paths are used where they are. Pictures are written once as PNG files into
`<output_dir>/dataset_class/<module.Class>/` (a file whose bytes are unchanged is not rewritten, so the image
checks and latent caches of an earlier start stay valid), and every example is listed with its caption in
`metadata.json` there, which the run then reads as a fine-tuning metadata file (`--in_json`), repeated
`--dataset_repeats` times.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from lorakit.atomic import staged_file
from lorakit.errors import ConfigError, DataError

PROTOCOL = ("built as Class(options), it must have len() and items dataset[i] that are (image, caption) pairs "
            "or mappings with 'image' and 'caption' (image: a PIL image or an image file's path; caption: text)")
METADATA_NAME = "metadata.json"
#: datasets from this size on show a progress bar while their examples are read and written
PROGRESS_FROM = 100
#: problems listed before the rest are only counted
MAX_LISTED = 10

#: (class name, folder; None for a dry run) -> metadata file already written by this process (the data is
#: planned more than once)
_exported: dict[tuple[str, Path | None], Path] = {}


def dataset_class_metadata(cfg: Any) -> Path:
    """Build the user's class, check every example and write the metadata file that lists them; its path."""
    name = str(cfg.dataset_class)
    if not getattr(cfg, "output_dir", None):
        raise ConfigError([f"--dataset_class {name}: give --output_dir; the class's pictures and the list of its "
                           "examples are written under it (dataset_class/)"])
    dry_run = bool(getattr(cfg, "dry_run", False))
    key = (name, None if dry_run else (Path(cfg.output_dir).expanduser() / "dataset_class").resolve())
    if key not in _exported:
        dataset = _instance(cfg, name)
        _exported[key] = _export(dataset, name, (_scratch_folder() if dry_run else key[1]) / name)
    return _exported[key]


def _scratch_folder() -> Path:
    """Where a --dry_run writes the class's examples: a folder of its own, removed when the process ends (a dry
    run leaves nothing behind in the output folder)."""
    folder = Path(tempfile.mkdtemp(prefix="lorakit-dataset-class-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _load_class(name: str) -> Any:
    from lorakit.training.optim import class_from, import_module

    what = f"--dataset_class {name}"
    module_name, dot, class_name = name.rpartition(".")
    if not dot or not module_name or not class_name:
        raise ConfigError([f"{what}: give the class as module.Class (e.g. my_data.MyDataset)"])
    return class_from(import_module(module_name, what), class_name, what)


def _instance(cfg: Any, name: str) -> Any:
    cls = _load_class(name)
    try:
        dataset = cls(cfg)
    except Exception as exc:  # the user's code: any failure is reported with the protocol it must follow
        raise DataError(f"--dataset_class {name}: {name}(options) failed ({type(exc).__name__}: {exc}); "
                        f"{PROTOCOL}") from exc
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise DataError(f"--dataset_class {name}: the object has no len() or dataset[i]; {PROTOCOL}")
    return dataset


def _export(dataset: Any, name: str, folder: Path) -> Path:
    """Check every example, write the pictures and the metadata file; every problem at once."""
    try:
        count = len(dataset)
    except Exception as exc:
        raise DataError(f"--dataset_class {name}: len() failed ({type(exc).__name__}: {exc}); {PROTOCOL}") from exc
    if count <= 0:
        raise DataError(f"--dataset_class {name}: the dataset has no examples (len() is {count})")
    folder.mkdir(parents=True, exist_ok=True)
    listed: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    from tqdm.auto import tqdm

    for index in tqdm(range(count), desc=f"reading {name}", unit="example", disable=count < PROGRESS_FROM):
        try:
            image, caption = _example(dataset, index)
            listed[str(_image_file(image, folder, index))] = {"caption": caption}
        except _BadExample as exc:
            problems.append(f"dataset[{index}]: {exc}")
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise DataError(f"--dataset_class {name}: {len(problems)} example(s) do not follow the protocol ({PROTOCOL}):\n"
                        + "\n".join(f"  - {p}" for p in shown))
    metadata = folder / METADATA_NAME
    with staged_file(metadata) as tmp:
        tmp.write_text(json.dumps(listed, ensure_ascii=False, indent=1), encoding="utf-8")
    return metadata


class _BadExample(Exception):
    """One example that does not follow the protocol (collected, then reported with the others)."""


def _example(dataset: Any, index: int) -> tuple[Any, str]:
    try:
        item = dataset[index]
    except Exception as exc:
        raise _BadExample(f"reading it failed ({type(exc).__name__}: {exc})") from exc
    if isinstance(item, Mapping):
        missing = [k for k in ("image", "caption") if k not in item]
        if missing:
            raise _BadExample(f"the mapping has no {' and no '.join(map(repr, missing))}")
        image, caption = item["image"], item["caption"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        image, caption = item
    else:
        raise _BadExample(f"got {type(item).__name__}, not an (image, caption) pair or a mapping")
    if not isinstance(caption, str):
        raise _BadExample(f"the caption is {type(caption).__name__}, not text")
    return image, caption


def _image_file(image: Any, folder: Path, index: int) -> Path:
    """The file of one example's image: the path given, or the picture written as `<index>.png`."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise _BadExample(f"the image file {path} does not exist")
        return path.resolve()
    if isinstance(image, Image.Image):
        return _write_png(image, folder / f"{index:06d}.png")
    raise _BadExample(f"the image is {type(image).__name__}, not a PIL image or a file path")


def _write_png(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    if not (path.is_file() and path.read_bytes() == data):  # unchanged files keep their checks and caches
        with staged_file(path) as tmp:
            tmp.write_bytes(data)
    return path.resolve()
