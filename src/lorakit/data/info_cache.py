"""`cache_info`: captions and image sizes of a folder kept in `<image_dir>/metadata_cache.json`.

The file has sd-scripts' layout, `{image path: {"caption": str, "resolution": [w, h]}}`, so either tool can
reuse the other's. Entries are trusted as sd-scripts trusts them; delete the file after editing captions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lorakit.atomic import staged_file
from lorakit.data.buckets import Size

logger = logging.getLogger(__name__)
INFO_CACHE_NAME = "metadata_cache.json"


def read_info_cache(image_dir: Path) -> dict[str, tuple[str, Size]]:
    """{image path: (caption, (w, h))} from the folder's cache file; empty when absent or unreadable."""
    path = image_dir / INFO_CACHE_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {key: (str(v["caption"]), (int(v["resolution"][0]), int(v["resolution"][1])))
                for key, v in data.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        logger.warning("ignoring unreadable %s (%s); it will be rewritten", path, err)
        return {}


def write_info_cache(image_dir: Path, entries: dict[str, tuple[str, Size]]) -> None:
    """Write the cache file atomically (a temporary file renamed over it)."""
    payload = {key: {"caption": caption, "resolution": list(size)} for key, (caption, size) in entries.items()}
    try:
        with staged_file(image_dir / INFO_CACHE_NAME, prefix=".metadata_cache.") as tmp, open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, ensure_ascii=False, indent=1)
    except OSError as err:  # a read-only dataset folder: the cache only saves time, training goes on
        logger.warning("cannot write %s (%s); image sizes will be read again next time",
                       image_dir / INFO_CACHE_NAME, err.strerror or err)
