"""Tests of the typed options, the `train` command line, --config_file TOML and the support table."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from lorakit.config import TrainConfig, build_config, build_train_parser, parse_train_args
from lorakit.config.rules import ERROR_RULES, WARNING_RULES
from lorakit.config.support import FALLBACKS, IMPLEMENTED, NO_EFFECT, PARTIAL, UNSUPPORTED, check_supported
from lorakit.errors import ConfigError

INVENTORY = Path(__file__).resolve().parents[2] / "shared" / "reference" / "sd-scripts-inventory.md"
BASE = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "data", "--resolution", "512"]
BASE += ["--output_dir", "out"]
REQUIRED = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "data", "resolution": 512}
REQUIRED |= {"output_dir": "out"}


def parse(*extra: str) -> TrainConfig:
    return parse_train_args(BASE + list(extra))[0]


def problems_of(argv: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_train_args(argv)
    return caught.value.problems


def write(tmp_path: Path, text: str, name: str = "opts.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and field types ------------------------------------------------------------------------------

SD_SCRIPTS_DEFAULTS = {
    "learning_rate": 2e-6,
    "max_train_steps": 1600,
    "max_train_epochs": None,
    "network_alpha": 1.0,
    "network_dim": None,
    "network_module": None,
    "caption_extension": ".caption",
    "caption_separator": ",",
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "save_model_as": "safetensors",
    "save_precision": None,
    "optimizer_type": "",
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "lr_scheduler_num_cycles": 1,
    "lr_scheduler_power": 1.0,
    "max_grad_norm": 1.0,
    "max_data_loader_n_workers": 8,
    "mixed_precision": "no",
    "loss_type": "l2",
    "huber_schedule": "snr",
    "huber_c": 0.1,
    "huber_scale": 1.0,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "prior_loss_weight": 1.0,
    "vae_batch_size": 1,
    "token_warmup_min": 1,
    "multires_noise_discount": 0.3,
    "weighting_scheme": "uniform",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "timestep_sampling": "sigma",
    "discrete_flow_shift": 3.0,
    "model_prediction_type": "sigma_scaled",
    "guidance_scale": 3.5,
    "sample_sampler": "ddim",
    "zero_stage": 2,
    "dynamo_backend": "inductor",
    "model_type": "flux",
    "dataset_repeats": 1,
    "resolution": None,
    "family": "auto",
    "dry_run": False,
    "enable_bucket": False,
}


def test_defaults_equal_sd_scripts():
    fields = TrainConfig.model_fields
    actual = {name: fields[name].get_default(call_default_factory=True) for name in SD_SCRIPTS_DEFAULTS}
    assert actual == SD_SCRIPTS_DEFAULTS


def test_every_inventory_flag_is_an_option():
    if not INVENTORY.is_file():
        pytest.skip(f"{INVENTORY} not present")
    text = INVENTORY.read_text(encoding="utf-8")
    section = text[text.index("## 2. Command-line") : text.index("## 3. Dataset")]
    table_flags = {
        flag
        for line in section.splitlines()
        if line.startswith("| `--")
        for flag in re.findall(r"--([a-z][a-z0-9_]*)", line.split("|")[1])
    }
    all_flags = set(re.findall(r"--([a-z][a-z0-9_]*)", section))
    assert len(table_flags) > 150  # the tables were found
    assert sorted(all_flags - set(TrainConfig.model_fields)) == []


def test_parser_has_one_flag_per_field_and_bools_are_switches():
    parser = build_train_parser()
    by_flag = {action.option_strings[0]: action for action in parser._actions if action.option_strings}
    assert {f"--{name}" for name in TrainConfig.model_fields} <= set(by_flag)
    assert by_flag["--enable_bucket"].nargs == 0
    assert by_flag["--network_args"].nargs == "*"
    assert by_flag["--text_encoder_lr"].nargs == "*"


def test_assignment_is_validated():
    cfg = TrainConfig(**REQUIRED)
    with pytest.raises(ValidationError):
        cfg.network_dim = 0


# --- command line and TOML -----------------------------------------------------------------------------------


def test_equals_and_space_forms_are_the_same():
    assert parse("--network_dim=16", "--learning_rate=1e-4").network_dim == 16
    cfg = parse("--network_dim", "16", "--learning_rate", "1e-4")
    assert (cfg.network_dim, cfg.learning_rate) == (16, 1e-4)


def test_precedence_cli_over_toml_over_default(tmp_path):
    path = write(
        tmp_path,
        'network_dim = 8\nnetwork_alpha = 4.0\n[optimizer]\nlearning_rate = 1e-4\n',
    )
    cfg, _ = parse_train_args(BASE + ["--config_file", str(path), "--network_dim", "32"])
    assert cfg.network_dim == 32  # command line beats the file
    assert cfg.network_alpha == 4.0  # file beats the default
    assert cfg.learning_rate == 1e-4  # key inside a [section] is flattened
    assert cfg.max_train_steps == 1600  # default


def test_toml_sections_are_flattened_and_name_is_completed(tmp_path):
    path = write(
        tmp_path,
        '[model]\npretrained_model_name_or_path = "m.safetensors"\n'
        '[data]\ntrain_data_dir = "d"\nresolution = "768,512"\n'
        '[whatever]\noutput_dir = "o"\nnetwork_args = ["conv_dim=4"]\n',
    )
    cfg, _ = parse_train_args(["--config_file", str(path)[: -len(".toml")]])  # ".toml" appended as sd-scripts
    assert cfg.resolution == (768, 512)
    assert cfg.network_kwargs() == {"conv_dim": "4"}


def test_key_in_two_sections_warns_and_last_wins(tmp_path):
    path = write(tmp_path, "[a]\nnetwork_dim = 4\n[b]\nnetwork_dim = 8\n")
    cfg, warnings = parse_train_args(BASE + ["--config_file", str(path)])
    assert cfg.network_dim == 8
    assert any("'network_dim' is set in [a] and again in [b]" in w for w in warnings)


def test_network_args_kept_as_strings():
    cfg = parse("--network_args", "conv_dim=8", "conv_alpha=4", "--network_dim", "16")
    assert cfg.network_args == ["conv_dim=8", "conv_alpha=4"]
    assert cfg.network_kwargs() == {"conv_dim": "8", "conv_alpha": "4"}


def test_network_args_without_equals_is_named():
    problems = problems_of(BASE + ["--network_args", "conv_dim8"])
    assert problems == ["--network_args: 'conv_dim8' is not of the form key=value"]


def test_network_args_values_are_checked():
    problems = problems_of(BASE + ["--network_args", "conv_dim=eight", "rank_dropout=1.5"])
    assert "--network_args: conv_dim must be an integer (got 'eight')" in problems
    assert "--network_args: rank_dropout must be in [0, 1) (got 1.5)" in problems


def test_optimizer_args_use_python_literals():
    cfg = parse("--optimizer_args", "weight_decay=0.01", "betas=0.9,0.999", "relative_step=False", "name=foo")
    expected = {"weight_decay": 0.01, "betas": (0.9, 0.999), "relative_step": False, "name": "foo"}
    assert cfg.optimizer_kwargs() == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("512", (512, 512)),
        ("512,768", (512, 768)),
        (" 640 , 384 ", (640, 384)),
        (512, (512, 512)),
        ([1024, 768], (1024, 768)),
    ],
)
def test_resolution_forms(raw, expected):
    assert TrainConfig(**(REQUIRED | {"resolution": raw})).resolution == expected


@pytest.mark.parametrize("raw", ["0", "512,768,1024", "abc", "-512", [512, "x"]])
def test_bad_resolution_is_reported(raw):
    with pytest.raises(ConfigError) as caught:
        build_config(REQUIRED | {"resolution": raw})
    assert caught.value.problems[0].startswith("--resolution: ")
    # The cross-field rule "resolution missing" must not pile on top of the field error.
    assert len(caught.value.problems) == 1


def test_resolution_from_toml_int(tmp_path):
    path = write(tmp_path, "resolution = 1024\n")
    argv = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", "o"]
    cfg, _ = parse_train_args(argv + ["--config_file", str(path)])
    assert cfg.resolution == (1024, 1024)


@pytest.mark.parametrize(
    "raw, stored, steps",
    [("100", 100, 100), ("0.1", 0.1, 160), ("5%", "5%", 80), ("12.5%", "12.5%", 200), (0.25, 0.25, 400), ("0", 0, 0)],
)
def test_warmup_steps_ratio_and_percent(raw, stored, steps):
    cfg = TrainConfig(**(REQUIRED | {"lr_scheduler": "cosine", "lr_warmup_steps": raw}))
    assert cfg.lr_warmup_steps == stored
    assert cfg.resolve_warmup_steps(1600) == steps


@pytest.mark.parametrize("raw", ["10.5", "150%", "-1", "ten"])
def test_bad_warmup_values(raw):
    with pytest.raises(ConfigError) as caught:
        build_config(REQUIRED | {"lr_scheduler": "cosine", "lr_warmup_steps": raw})
    assert caught.value.problems[0].startswith("--lr_warmup_steps: ")


def test_decay_steps_resolve_like_warmup():
    cfg = TrainConfig(**(REQUIRED | {"lr_decay_steps": "25%"}))
    assert cfg.resolve_decay_steps(200) == 50


def test_face_crop_range_and_text_encoder_lrs(tmp_path):
    argv = BASE + ["--face_crop_aug_range", "0.2,0.5", "--text_encoder_lr", "1e-5", "2e-5"]
    cfg, _ = parse_train_args(argv, check_support=False)
    assert cfg.face_crop_aug_range == (0.2, 0.5)
    assert cfg.text_encoder_lr == [1e-5, 2e-5]
    path = write(tmp_path, "text_encoder_lr = 5e-5\n")  # a single TOML number is one learning rate
    assert parse("--config_file", str(path)).text_encoder_lr == [5e-5]
    problems = problems_of(BASE + ["--face_crop_aug_range", "0.5,0.2"])
    assert problems[0].startswith("--face_crop_aug_range: the first number must not exceed the second")


def test_legacy_caption_extention_maps_onto_caption_extension():
    assert parse("--caption_extention", ".txt").caption_extension == ".txt"
    assert parse("--caption_extension", ".txt").caption_extention is None


def test_abbreviated_option_is_accepted_with_warning():
    cfg, warnings = parse_train_args(BASE + ["--max_train_ep", "3"])
    assert cfg.max_train_epochs == 3
    assert "--max_train_ep is taken as --max_train_epochs; please write options in full" in warnings


# --- errors: all at once, readable ---------------------------------------------------------------------------


def test_three_mistakes_in_one_error():
    argv = BASE + ["--netwrk_dim", "16", "--network_dim", "abc", "--full_fp16", "--mixed_precision", "bf16"]
    with pytest.raises(ConfigError) as caught:
        parse_train_args(argv, check_support=False)
    problems = caught.value.problems
    assert "unknown option --netwrk_dim (did you mean --network_dim?)" in problems
    assert "--network_dim: must be an integer (got 'abc')" in problems
    assert "--full_fp16 requires --mixed_precision fp16 (got 'bf16')" in problems
    assert len(problems) == 3
    assert str(caught.value).startswith("3 problems in the options:")


def test_range_error_reads_like_the_option():
    assert problems_of(BASE + ["--network_dim", "0"]) == ["--network_dim: must be >= 1 (got 0)"]
    assert problems_of(BASE + ["--mixed_precision", "fp32"]) == [
        "--mixed_precision: must be one of 'no', 'fp16' or 'bf16' (got 'fp32')"
    ]
    assert problems_of(BASE + ["--network_dropout", "1"]) == ["--network_dropout: must be < 1 (got 1)"]


def test_unknown_toml_key_names_file_and_line(tmp_path):
    path = write(tmp_path, '[network]\nnetwork_dim = 8\nnetwork_alpah = 4\n')
    problems = problems_of(BASE + ["--config_file", str(path)])
    assert problems == [f"{path} line 3: unknown key 'network_alpah' in [network] (did you mean 'network_alpha'?)"]


def test_bad_toml_value_names_the_file(tmp_path):
    path = write(tmp_path, "gradient_accumulation_steps = 0\n")
    problems = problems_of(BASE + ["--config_file", str(path)])
    assert problems == [f"gradient_accumulation_steps in {path} line 1: must be >= 1 (got 0)"]


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, 'network_dim = 8\nnetwork_alpha = = 4\n')
    (problem,) = problems_of(BASE + ["--config_file", str(path)])
    assert problem.startswith(f"{path}: not valid TOML") and "line 2" in problem


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.toml"
    assert problems_of(BASE + ["--config_file", str(missing)]) == [f"--config_file: {missing} does not exist"]


def test_dataset_config_passed_as_config_file_is_explained(tmp_path):
    path = write(tmp_path, "[general]\nenable_bucket = true\n[[datasets]]\nresolution = 512\n")
    problems = problems_of(BASE + ["--config_file", str(path)])
    assert any("looks like a dataset config" in p and "--dataset_config" in p for p in problems)


def test_missing_value_and_stray_argument():
    assert problems_of(BASE + ["--network_dim"]) == ["--network_dim: expected one argument"]
    assert problems_of(BASE + ["stray"]) == ["unexpected argument 'stray' (options start with --)"]


def test_required_inputs_are_all_reported_at_once():
    problems = problems_of([])
    assert len(problems) == 4
    for name in ("--pretrained_model_name_or_path", "--train_data_dir", "--resolution", "--output_dir"):
        assert any(name in p for p in problems)


def test_dry_run_needs_no_output_dir_and_dataset_config_no_resolution():
    cfg, _ = parse_train_args(["--pretrained_model_name_or_path", "m", "--dataset_config", "d.toml", "--dry_run"])
    assert cfg.dry_run and cfg.output_dir is None and cfg.resolution is None


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other (nothing to train)"),
        (["--full_bf16"], "--full_bf16 requires --mixed_precision bf16"),
        (["--v_parameterization", "--v_pred_like_loss", "0.1"], "--v_pred_like_loss cannot be used with --v_param"),
        (["--scale_v_pred_loss_like_noise_pred"], "requires --v_parameterization"),
        (["--cache_latents", "--color_aug"], "--cache_latents cannot be used with --color_aug"),
        (["--cache_latents_to_disk", "--random_crop"], "--cache_latents_to_disk cannot be used with --random_crop"),
        (["--max_train_epochs", "0"], "--max_train_epochs: must be >= 1 (got 0)"),
        (["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale requires --noise_offset"),
        (["--fp8_base"], "--fp8_base requires --mixed_precision fp16 or bf16"),
        (["--use_8bit_adam", "--optimizer_type", "Lion"], "cannot be combined with --optimizer_type"),
        (["--lr_warmup_steps", "100"], "--lr_scheduler constant has none"),
        (["--log_with", "tensorboard"], "--log_with tensorboard requires --logging_dir"),
        (["--min_timestep", "500", "--max_timestep", "100"], "--min_timestep (500) must be smaller"),
        (["--enable_bucket", "--max_bucket_reso", "256"], "--max_bucket_reso (256) must be >="),
        (["--family", "sdxl", "--bucket_reso_steps", "48"], "multiple of 32 for --family sdxl"),
        (["--family", "sdxl", "--v2"], "--v2 selects an SD 2.x model"),
        (["--base_weights", "a.safetensors", "--base_weights_multiplier", "1", "0.5"], "one value per --base_weights"),
        (["--output_config"], "--output_config writes to the --config_file path"),
    ],
)
def test_cross_field_rules(extra, expected):
    with pytest.raises(ConfigError) as caught:
        parse_train_args(BASE + extra, check_support=False)
    assert any(expected in p for p in caught.value.problems), caught.value.problems


def test_rules_name_the_options_they_read():
    fields = set(TrainConfig.model_fields)
    for rule in ERROR_RULES + WARNING_RULES:
        assert rule.fields and set(rule.fields) <= fields, rule.check.__name__


def test_cross_field_warnings():
    _, warnings = parse_train_args(BASE + ["--dataset_config", "d.toml", "--v2", "--clip_skip", "2"])
    assert "--dataset_config is given, so --train_data_dir is ignored" in warnings
    assert any(w.startswith("--clip_skip with --v2") for w in warnings)


def test_text_encoder_disk_cache_turns_on_the_cache():
    _, warnings = parse_train_args(BASE + ["--cache_text_encoder_outputs_to_disk"])
    assert "--cache_text_encoder_outputs_to_disk turns on --cache_text_encoder_outputs" in warnings
    assert not any("cached in memory" in w for w in warnings)  # the files are real now


# --- supported / unsupported ---------------------------------------------------------------------------------


def test_support_tables_cover_every_field_once():
    tables = [set(IMPLEMENTED), set(UNSUPPORTED), set(FALLBACKS), set(NO_EFFECT)]
    assert sum(len(t) for t in tables) == len(set().union(*tables))  # disjoint
    assert set().union(*tables) == set(TrainConfig.model_fields)
    assert set(PARTIAL) <= IMPLEMENTED


def test_unsupported_option_message():
    problems = problems_of(BASE + ["--dataset_class", "x.Y"])
    assert len(problems) == 1 and problems[0].startswith(
        "--dataset_class is recognised but not implemented yet in lorakit; a dataset class written for sd-scripts")
    # every other option sd-scripts' LoRA training has is implemented, or accepted with a warning
    assert set(UNSUPPORTED) == {"dataset_class"}


def test_partially_supported_values():
    assert parse("--optimizer_type", "adamw").optimizer_type == "adamw"  # case-insensitive
    assert parse("--network_module", "networks.lora").network_module == "networks.lora"
    problems = problems_of(
        BASE
        + ["--network_module", "networks.lora_lumina", "--lr_scheduler", "reduce_lr_on_plateau"]
        + ["--network_args", "conv_dim=4", "algo=locon"]
    )
    assert any(p.startswith("--network_module networks.lora_lumina is recognised but not implemented") for p in problems)
    assert len(problems) == 1  # the plateau schedule is checked with the dataset (it needs validation images)
    # networks.lora itself rejects keys of other modules, naming them
    problems = problems_of(BASE + ["--network_args", "conv_dim=4", "algo=locon"])
    assert problems == [p for p in problems if p.startswith("--network_args algo is recognised")] and problems


def test_xformers_warns_and_loading_switches_are_silent():
    cfg, warnings = parse_train_args(BASE + ["--xformers", "--lowram", "--highvram", "--sdpa"])
    assert cfg.xformers and cfg.lowram
    assert warnings == ["--xformers: lorakit uses PyTorch SDPA attention instead; training continues"]
    errors, _ = check_supported(cfg)
    assert errors == []


# --- --output_config -----------------------------------------------------------------------------------------


def test_output_config_writes_non_defaults_and_round_trips(tmp_path):
    target = tmp_path / "saved.toml"
    argv = BASE + ["--network_dim", "16", "--network_args", "conv_dim=4", "--resolution", "768,512"]
    argv += ["--lr_scheduler", "cosine", "--lr_warmup_steps", "10%", "--config_file", str(target), "--output_config"]
    written, _ = parse_train_args(argv)
    data = tomllib.loads(target.read_text(encoding="utf-8"))
    flat = {k: v for table in data.values() for k, v in table.items()}
    assert flat["resolution"] == "768,512"  # sd-scripts splits this string itself
    assert flat["network_dim"] == 16 and flat["lr_warmup_steps"] == "10%"
    assert "config_file" not in flat and "output_config" not in flat and "max_train_steps" not in flat
    reread, _ = parse_train_args(["--config_file", str(target)])
    assert reread.model_dump(exclude={"config_file", "output_config"}) == written.model_dump(
        exclude={"config_file", "output_config"}
    )
    with pytest.raises(ConfigError, match="already exists"):
        parse_train_args(argv)


def test_output_config_accepts_a_partial_config(tmp_path):
    target = tmp_path / "partial.toml"
    cfg, _ = parse_train_args(["--network_dim", "8", "--config_file", str(target), "--output_config"])
    assert cfg.output_config and cfg.pretrained_model_name_or_path is None
    assert target.read_text(encoding="utf-8") == "[network]\nnetwork_dim = 8\n"


def test_text_encoder_cache_refuses_captions_that_change():
    problems = problems_of(BASE + ["--cache_text_encoder_outputs", "--shuffle_caption", "--caption_dropout_rate=0.1"])
    assert problems == [
        "--cache_text_encoder_outputs cannot be used with --shuffle_caption, --caption_dropout_rate "
        "(a cached caption encoding cannot change per step)"
    ]
