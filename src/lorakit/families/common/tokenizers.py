"""Tokenizers: CLIP's from files bundled with lorakit; T5's from beside the model, a cache folder, or the model hub."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

from lorakit.checkpoint_io import first_line
from lorakit.errors import CheckpointError

# OpenAI's CLIP BPE vocabulary (49,408 tokens): vocab.json + merges.txt.
_CLIP_TOKENIZER_DIR = resources.files("lorakit") / "assets" / "clip_tokenizer"

# The pad token each text-encoder lineage was trained with: OpenAI CLIP (SD 1.x) pads with the end token,
# OpenCLIP (SD 2.x, SDXL's second encoder) pads with "!" (id 0).
CLIP_PAD_END = "<|endoftext|>"
CLIP_PAD_OPENCLIP = "!"

# The files a saved T5 (SentencePiece) tokenizer is read from: either one will do.
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def bundled_clip_tokenizer(pad_token: str = CLIP_PAD_END, max_length: int = 77) -> CLIPTokenizer:
    """The CLIP BPE tokenizer from lorakit's own files, padding with `pad_token` to `max_length`."""
    return CLIPTokenizer.from_pretrained(
        str(_CLIP_TOKENIZER_DIR), model_max_length=max_length, pad_token=pad_token, local_files_only=True
    )


def folder_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer saved in a diffusers pipeline's `tokenizer/` folder."""
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read the tokenizer in this folder ({exc})") from None


def t5_tokenizer_in(folder: Path) -> T5Tokenizer | None:
    """The T5 tokenizer saved in `folder`, or None if the folder holds no T5 tokenizer files."""
    if not any((folder / name).is_file() for name in T5_TOKENIZER_FILES):
        return None
    try:
        return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read the T5 tokenizer in this folder ({first_line(exc)})") from None


#: the T5 tokenizer sd-scripts loads for SD3 and FLUX.1 (`strategy_sd3.py`, `strategy_flux.py`), and the
#: folder name its `--tokenizer_cache_dir` saves it under
T5_TOKENIZER_ID = "google/t5-v1_1-xxl"
T5_CACHE_NAME = T5_TOKENIZER_ID.replace("/", "_")
#: what is fetched: the SentencePiece model (all a T5 tokenizer needs) and its two small settings files
T5_HUB_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def find_t5_tokenizer(anchors: list[Path], subfolders: tuple[str, ...], needed_by: str,
                      cache_dir: str | Path | None = None) -> T5Tokenizer:
    """The T5 tokenizer for a model read from single files, looked for in this order:

    1. a folder beside one of `anchors` (a model folder, the checkpoint or the --t5xxl file): the anchor's own
       folder ("") or one of `subfolders` there;
    2. `--tokenizer_cache_dir` DIR: DIR/google_t5-v1_1-xxl/ (where sd-scripts caches it) or DIR itself;
    3. the model hub (`huggingface_hub`, as sd-scripts loads it), into its cache, and saved into
       DIR/google_t5-v1_1-xxl with --tokenizer_cache_dir so later runs need no network.

    Offline, or with the hub unreachable, the error names the files, where to get them and where to put them.
    """
    for anchor in anchors:
        base = anchor if anchor.is_dir() else anchor.parent
        for sub in subfolders:
            tokenizer = t5_tokenizer_in(base / sub if sub else base)
            if tokenizer is not None:
                return tokenizer
    if cache_dir:
        for folder in (Path(cache_dir) / T5_CACHE_NAME, Path(cache_dir)):
            tokenizer = t5_tokenizer_in(folder)
            if tokenizer is not None:
                return tokenizer
    tokenizer, reason = _fetch_t5_tokenizer(cache_dir)
    if tokenizer is not None:
        return tokenizer
    base = anchors[0] if anchors[0].is_dir() else anchors[0].parent
    places = " or ".join(f"{base / sub}/" if sub else f"{base}/" for sub in subfolders[:2])
    raise CheckpointError(
        f"{anchors[0]}: no T5 tokenizer found; {needed_by} needs the T5-XXL tokenizer and {reason}. Put spiece.model "
        f"(with tokenizer_config.json and special_tokens_map.json if you have them; a tokenizer.json works too) from "
        f"https://huggingface.co/{T5_TOKENIZER_ID} in {places}, or in DIR/{T5_CACHE_NAME}/ and pass "
        "--tokenizer_cache_dir DIR"
    )


def _fetch_t5_tokenizer(cache_dir: str | Path | None) -> tuple[T5Tokenizer | None, str]:
    """(the tokenizer from the model hub, "") or (None, why not), without waiting long on a network that is down."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        return None, "huggingface_hub, which would fetch it, is not installed"
    if constants.HF_HUB_OFFLINE:
        return None, "the model hub is off (HF_HUB_OFFLINE is set)"
    unreachable = _unreachable(constants.ENDPOINT)
    if unreachable:  # huggingface_hub would retry a refused connection for half a minute
        return None, f"the model hub at {constants.ENDPOINT} could not be reached ({unreachable})"
    try:
        spiece = Path(hf_hub_download(T5_TOKENIZER_ID, T5_HUB_FILES[0], etag_timeout=10))
        for name in T5_HUB_FILES[1:]:
            try:
                hf_hub_download(T5_TOKENIZER_ID, name, etag_timeout=10)
            except Exception:  # noqa: BLE001 - the settings files are optional: T5's defaults are theirs
                pass
        tokenizer = T5Tokenizer.from_pretrained(str(spiece.parent), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - every network or hub failure ends in the same advice
        return None, f"the model hub at {constants.ENDPOINT} could not be reached ({type(exc).__name__}: {first_line(exc)})"
    if cache_dir:
        tokenizer.save_pretrained(str(Path(cache_dir) / T5_CACHE_NAME))
    return tokenizer, ""


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why `endpoint` cannot be reached (None when it answers at all: any HTTP status means it is there)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return first_line(getattr(exc, "reason", exc))
    return None
