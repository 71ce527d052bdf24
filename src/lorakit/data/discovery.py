"""Finding training images: `N_name` repeat folders, image files and their caption files (sd-scripts §3.3).

All problems with the files of one scan (unreadable captions, empty caption files) are collected and
raised together as one `DataError`, so a user fixes a dataset in one pass instead of one file per run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER_HINT = "put images in a subfolder named like 10_mychar (10 = repeats per epoch, mychar = class tokens)"


@dataclass(frozen=True)
class RepeatFolder:
    """A `N_name` subfolder: N repeats, the rest of the name as class tokens."""

    path: Path
    num_repeats: int
    class_tokens: str
    is_reg: bool


@dataclass(frozen=True)
class ImageRecord:
    """One image file with the caption it trains with (before per-step caption processing)."""

    path: Path
    caption: str
    has_caption_file: bool


def parse_repeat_folder_name(name: str) -> tuple[int, str] | None:
    """Split `10_sks girl` into (10, "sks girl"); None when the first `_` token is not an integer."""
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, rest


def scan_repeat_folders(parent: str | Path, is_reg: bool) -> list[RepeatFolder]:
    """List the usable `N_name` subfolders of a train or regularisation folder, sorted by name.

    Folders without a numeric prefix are skipped with a warning naming them. A missing or unreadable folder,
    one without any usable subfolder, and subfolders with fewer than 1 repeat (`0_x`, `-1_x`: an epoch that
    never shows their images) are a `DataError` naming them all.
    """
    option = "--reg_data_dir" if is_reg else "--train_data_dir"
    root = Path(parent)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"{option} {root} {what}; {FOLDER_HINT} inside it")
    folders: list[RepeatFolder] = []
    no_repeats: list[str] = []
    for sub in sorted(p for p in readable_entries(root, option) if p.is_dir()):
        parsed = parse_repeat_folder_name(sub.name)
        if parsed is None:
            logger.warning("ignoring folder %s: its name does not start with a number of repeats "
                           "(expected a name like 10_mychar)", sub)
            continue
        repeats, class_tokens = parsed
        if repeats < 1:
            no_repeats.append(f"{sub} ({repeats})")
            continue
        folders.append(RepeatFolder(sub, repeats, class_tokens, is_reg))
    if no_repeats:
        raise DataError(f"{option}: the number of repeats before the first _ must be 1 or more: "
                        f"{', '.join(no_repeats)}; rename the folder (e.g. 1_name) or move it out")
    if not folders and not is_reg:
        raise DataError(f"{option} {root} has no usable image folder; {FOLDER_HINT}")
    return folders


def readable_entries(folder: Path, what: str = "image folder") -> list[Path]:
    """The entries of a folder, or a `DataError` naming it when it cannot be listed (permissions, I/O)."""
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise DataError(f"{what} {folder} cannot be read ({err.strerror or err})") from None


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (not recursive), any letter case of the extension, sorted."""
    return sorted(p for p in readable_entries(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def caption_candidates(image: Path, caption_extension: str) -> list[Path]:
    """Caption paths to try: `<stem><ext>`, then the stem without a face-crop suffix `_cx_cy_w_h`."""
    stem = image.with_suffix("")
    candidates = [Path(str(stem) + caption_extension)]
    tokens = image.stem.split("_")
    if len(tokens) >= 5:
        candidates.append(image.parent / ("_".join(tokens[:-4]) + caption_extension))
    return candidates


def read_caption_file(path: Path, all_lines: bool = False) -> str:
    """First line of a caption file (or all non-empty lines joined by newlines), stripped.

    Empty or non-UTF-8 files are a `DataError` naming the file.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"caption file {path} cannot be read ({err.strerror or err})") from None
    if not data:
        raise DataError(f"caption file {path} is empty (0 bytes); write a caption or delete the file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"caption file {path} is not UTF-8 text (byte {err.start}); "
                        "save it with UTF-8 encoding") from None
    if all_lines:
        return "\n".join(line.strip() for line in text.splitlines() if line.strip())
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def find_caption(image: Path, caption_extension: str, all_lines: bool = False) -> str | None:
    """The caption for `image`, or None when no caption file exists."""
    for candidate in caption_candidates(image, caption_extension):
        if candidate.is_file():
            return read_caption_file(candidate, all_lines)
    return None


def face_box_from_name(image: Path) -> tuple[int, int, int, int] | None:
    """(centre x, centre y, width, height) of a face from a `name_cx_cy_w_h` file name, or None."""
    tokens = image.stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        return tuple(int(t) for t in tokens[-4:])  # type: ignore[return-value]
    except ValueError:
        return None


def collect_images(image_dir: Path, caption_extension: str, class_tokens: str | None,
                   all_lines: bool = False, known_captions: dict[str, str] | None = None) -> list[ImageRecord]:
    """Images of one subset folder with their captions (class tokens where no caption file exists).

    An image listed in `known_captions` (by its path as text, from the info cache) takes that caption without
    its caption file being read. Raises one `DataError` listing every bad caption file of the folder.
    """
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    records: list[ImageRecord] = []
    problems: list[str] = []
    for image in list_images(image_dir):
        if known_captions and str(image) in known_captions:
            records.append(ImageRecord(image, known_captions[str(image)], True))
            continue
        try:
            caption = find_caption(image, caption_extension, all_lines)
        except DataError as err:
            problems.append(str(err))
            continue
        if caption is None:
            records.append(ImageRecord(image, class_tokens or "", False))
        else:
            records.append(ImageRecord(image, caption, True))
    if problems:
        raise DataError("\n".join(problems))
    return records


def missing_caption_message(counts: list[tuple[Path, int]], caption_extension: str) -> str | None:
    """One warning line for all folders with images lacking a caption file, or None when there are none."""
    counts = [(folder, n) for folder, n in counts if n]
    if not counts:
        return None
    total = sum(n for _, n in counts)
    where = ", ".join(f"{folder} ({n})" for folder, n in counts)
    return (f"{total} image(s) have no {caption_extension} caption file and train with their folder's "
            f"class tokens (or an empty caption): {where}")
