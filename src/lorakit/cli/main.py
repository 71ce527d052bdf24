"""`lorakit` command line: one entry point, one subcommand per job.

A user mistake (a LorakitError) prints a short message and exits with status 2, without a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from lorakit.errors import LorakitError

USAGE = """usage: lorakit <command> [options]   (lorakit --version prints the version)

commands:
  train     train a LoRA (sd-scripts option names: lorakit train --help)
  textual-inversion   train a token embedding (train_textual_inversion.py's options: --token_string, --init_word, ...)
  controlnet          train a ControlNet (SD 1.x/2.x, FLUX.1) or a ControlNet-LLLite (SDXL) on image/conditioning pairs
  finetune  fine-tune the model's own weights, any family (fine_tune.py, sdxl_train.py, sd3_train.py,
            flux_train.py command lines; docs/finetune.md)
  dreambooth  DreamBooth as train_db.py: the text encoder trains unless --stop_text_encoder_training -1
  cache     encode the dataset's latents (and, with --cache_text_encoder_outputs_to_disk, its captions) to
            sd-scripts' .npz cache files, without training (train options)
  demo      train a LoRA on the built-in toy model and dataset on the CPU, with before/after samples
  lora      LoRA file tools: resize, merge, extract, convert, inspect, dylora, sample (lorakit lora --help)
  sample    generate images with LoRAs merged into a base model, any family (lorakit sample --help)
  generate  generate images: prompt files, batches, LoRAs, img2img, inpainting, highres fix (lorakit generate --help)
  model     base-model tools: convert, merge, inspect (lorakit model --help)
  bench     step time of the trainer against the bare model step (lorakit bench --help)
  tag       tag a folder's images with a WD14 tagger (ONNX) into .txt files or metadata (lorakit tag --help)
  caption   caption a folder's images with BLIP, GIT or Qwen2.5-VL from a local model folder (lorakit caption --help)
  dataset   metadata and image tools: merge-captions, merge-tags, clean, resize, canny (lorakit dataset --help)

Any sd-scripts train_network.py command line works after `lorakit train`; fine_tune.py, sdxl_train.py,
sd3_train.py and flux_train.py command lines after `lorakit finetune`, train_db.py's after `lorakit dreambooth`.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from lorakit import __version__

        print(f"lorakit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"train": _train, "textual-inversion": _textual_inversion, "controlnet": _controlnet,
                "finetune": _finetune, "dreambooth": _dreambooth, "cache": _cache, "demo": _demo, "lora": _lora,
                "sample": _sample, "generate": _generate, "model": _model, "bench": _bench,
                "tag": _tag, "caption": _caption, "dataset": _dataset}
    if command not in commands:
        print(f"lorakit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    _configure_logging()
    try:
        return commands[command](rest)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _configure_logging() -> None:
    level = os.environ.get("LORAKIT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format="%(levelname)s: %(message)s", stream=sys.stderr)
    # third-party libraries are chatty at INFO; their warnings still show
    for name in ("diffusers", "transformers", "accelerate", "torch", "PIL", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes (imported by the libraries above when installed) warns on CPUs with bf16 instructions that an
    # optional kernel package is missing; lorakit never runs its 4-bit CPU kernels
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers warns at import that torchvision is absent (only its image processors need it) and shows a
    # progress bar for every small weight file; neither helps someone training a LoRA
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def apply_console_options(cfg) -> None:
    """--console_log_level, --console_log_file (instead of stderr) and --console_log_simple (bare messages)."""
    root = logging.getLogger()
    if cfg.console_log_level:
        root.setLevel(cfg.console_log_level)
    if cfg.console_log_file or cfg.console_log_simple:
        try:
            handler = logging.FileHandler(cfg.console_log_file, encoding="utf-8") if cfg.console_log_file else logging.StreamHandler(sys.stderr)
        except OSError as exc:
            from lorakit.errors import ConfigError

            raise ConfigError([f"--console_log_file {cfg.console_log_file}: cannot be written ({exc.strerror or exc})"]) from None
        handler.setFormatter(logging.Formatter("%(message)s" if cfg.console_log_simple else "%(asctime)s %(levelname)s: %(message)s"))
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)


def _train(argv: list[str], command: str = "train") -> int:
    from lorakit.config import build_train_parser, read_train_args
    from lorakit.errors import ConfigError

    if any(arg in ("-h", "--help") for arg in argv):
        build_train_parser().print_help()
        return 0
    parsed = read_train_args(argv, command=command)
    cfg = parsed.config
    if cfg is None or (parsed.problems and cfg.output_config):
        raise ConfigError(parsed.problems)
    apply_console_options(cfg)
    for warning in parsed.warnings:
        logging.getLogger("lorakit").warning(warning)
    if cfg.output_config:
        print(f"wrote the options to {cfg.config_file}")
        return 0
    from lorakit.training.run import train

    # the options' problems are reported with the files' and the data's
    result = train(cfg, _training_type(command), parsed.problems)
    if result.saved_files:
        print(f"saved {result.saved_files[-1]}")
    return 0


def _training_type(command: str):
    """The training type a command trains (imported only once the options are read)."""
    if command == "textual-inversion":
        from lorakit.training.textual_inversion import TEXTUAL_INVERSION

        return TEXTUAL_INVERSION
    if command == "controlnet":
        from lorakit.training.controlnet import CONTROLNET

        return CONTROLNET
    if command in ("finetune", "dreambooth"):
        from lorakit.training.finetune_setup import FINETUNE

        return FINETUNE
    from lorakit.training.network_trainable import NETWORK

    return NETWORK


def _textual_inversion(argv: list[str]) -> int:
    """`lorakit textual-inversion`: sd-scripts' train_textual_inversion.py / sdxl_train_textual_inversion.py."""
    return _train(argv, "textual-inversion")


def _controlnet(argv: list[str]) -> int:
    """`lorakit controlnet`: train_control_net.py, sdxl_train_control_net_lllite.py, flux_train_control_net.py."""
    return _train(argv, "controlnet")


def _finetune(argv: list[str]) -> int:
    """`lorakit finetune`: fine_tune.py, sdxl_train.py, sd3_train.py, flux_train.py."""
    return _train(argv, "finetune")


def _dreambooth(argv: list[str]) -> int:
    """`lorakit dreambooth`: train_db.py (the text encoder trains by default)."""
    return _train(argv, "dreambooth")


def _demo(argv: list[str]) -> int:
    from lorakit.toy.demo import run_demo_cli

    return run_demo_cli(argv)


def _lora(argv: list[str]) -> int:
    from lorakit.cli.lora import main as lora_main

    return lora_main(argv)


def _sample(argv: list[str]) -> int:
    from lorakit.cli.sample import main as sample_main

    return sample_main(argv)


def _generate(argv: list[str]) -> int:
    from lorakit.cli.generate import main as generate_main

    return generate_main(argv)


def _model(argv: list[str]) -> int:
    from lorakit.cli.model import main as model_main

    return model_main(argv)


def _bench(argv: list[str]) -> int:
    from lorakit.bench import main as bench_main

    return bench_main(argv)


def _tag(argv: list[str]) -> int:
    from lorakit.cli.prep import tag_main

    return tag_main(argv)


def _caption(argv: list[str]) -> int:
    from lorakit.cli.prep import caption_main

    return caption_main(argv)


def _dataset(argv: list[str]) -> int:
    from lorakit.cli.prep import dataset_main

    return dataset_main(argv)


def _cache(argv: list[str]) -> int:
    """`lorakit cache`: the train command's options; latents (and text-encoder outputs) to their cache files."""
    from lorakit.cli.cache import cache_files
    from lorakit.config import parse_train_args

    cfg, warnings = parse_train_args(argv)
    apply_console_options(cfg)
    for warning in warnings:
        logging.getLogger("lorakit").warning(warning)
    return cache_files(cfg)
