"""Options a careless user gets wrong end in one line naming the option, never in a traceback or a NaN file;
and the small things a user expects (`--version`, logged options without the machine's paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.cli.main import main

BAD_TOOL_OPTIONS = [
    (["merge", "--models", "a.safetensors", "b.safetensors", "--ratios", "1", "nan", "--save_to", "m.safetensors"], "--ratios"),
    (["merge", "--models", "a.safetensors", "--ratios", "inf", "--save_to", "m.safetensors"], "--ratios"),
    (["merge", "--models", "a.safetensors", "--new_rank", "0", "--save_to", "m.safetensors"], "--new_rank"),
    (["merge", "--models", "a.safetensors", "--new_rank", "4", "--new_conv_rank", "-2", "--save_to", "m.safetensors"], "--new_conv_rank"),
    (["merge", "--models", "a.safetensors", "--new_rank", "4", "--clamp_quantile", "nan", "--save_to", "m.safetensors"], "--clamp_quantile"),
    (["merge", "--models", "a.safetensors", "--new_rank", "4", "--clamp_quantile", "1.5", "--save_to", "m.safetensors"], "--clamp_quantile"),
    (["merge", "--models", "a.safetensors", "--lbws", "[1, NaN, 1]", "--save_to", "m.safetensors"], "--lbws"),
    (["resize", "--model", "a.safetensors", "--save_to", "r.safetensors", "--new_rank", "-1"], "--new_rank"),
    (["resize", "--model", "a.safetensors", "--save_to", "r.safetensors", "--new_conv_rank", "0"], "--new_conv_rank"),
    (["resize", "--model", "a.safetensors", "--save_to", "r.safetensors", "--dynamic_method", "sv_fro", "--dynamic_param", "nan"], "--dynamic_param"),
    (["resize", "--model", "a.safetensors", "--save_to", "r.safetensors", "--dynamic_method", "sv_fro", "--dynamic_param", "1.5"], "--dynamic_param"),
    (["resize", "--model", "a.safetensors", "--save_to", "r.safetensors", "--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"], "--dynamic_param"),
    (["resize", "--model", "a.safetensors", "--save_to", "r.safetensors", "--dynamic_method", "sv_cumulative", "--dynamic_param", "-0.1"], "--dynamic_param"),
    (["resize", "--model", "a.safetensors", "--save_to", "r.safetensors", "--score_recipes", "fro_ckpt=1,thr=inf"], "--score_recipes"),
    (["extract", "--model_org", "a", "--model_tuned", "b", "--save_to", "e.safetensors", "--dim", "0"], "--dim"),
    (["extract", "--model_org", "a", "--model_tuned", "b", "--save_to", "e.safetensors", "--conv_dim", "-4"], "--conv_dim"),
    (["extract", "--model_org", "a", "--model_tuned", "b", "--save_to", "e.safetensors", "--clamp_quantile", "inf"], "--clamp_quantile"),
    (["extract", "--model_org", "a", "--model_tuned", "b", "--save_to", "e.safetensors", "--min_diff", "nan"], "--min_diff"),
    (["extract", "--model_org", "a", "--model_tuned", "b", "--save_to", "e.safetensors", "--min_diff", "-1"], "--min_diff"),
    (["dylora", "--model", "a.safetensors", "--save_to", "d.safetensors", "--new_rank", "0"], "--new_rank"),
    (["dylora", "--model", "a.safetensors", "--save_to", "d.safetensors", "--unit", "-8"], "--unit"),
    (["sample", "--ckpt_path", "m", "--prompt", "p", "--guidance_scale", "nan"], "--guidance_scale"),
    (["sample", "--ckpt_path", "m", "--prompt", "p", "--guidance_scale", "-1"], "--guidance_scale"),
    (["sample", "--ckpt_path", "m", "--prompt", "p", "--steps", "0"], "--steps"),
    (["sample", "--ckpt_path", "m", "--prompt", "p", "--width", "-64"], "--width"),
    (["sample", "--ckpt_path", "m", "--prompt", "p", "--seed", "-1"], "--seed"),
    (["sample", "--ckpt_path", "m", "--prompt", "p", "--clip_skip", "0"], "--clip_skip"),
]


@pytest.mark.parametrize("argv, option", BAD_TOOL_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_numeric_tool_options_refuse_nan_infinity_and_meaningless_values(argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing here exists: the option must be refused before any file is looked at
    status = main(["lora", *argv]) if argv[0] != "sample" else main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if option in line and "usage" not in line]
    assert lines and ("error: argument" in lines[0] or lines[0].lstrip().startswith("- ")), err
    assert not list(tmp_path.iterdir()), "no output file"


def test_prompt_file_values_must_be_finite(tmp_path):
    from lorakit.errors import ConfigError
    from lorakit.sampling.prompts import read_sample_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --l nan\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a finite number"):
        read_sample_prompts(prompts)


def test_version(capsys):
    from lorakit import __version__

    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out.strip() == f"lorakit {__version__}"


def test_logged_config_holds_no_absolute_path(tmp_path):
    from lorakit.config import parse_train_args
    from lorakit.training.trackers import tracker_config

    tracker = tmp_path / "trackers.toml"
    argv = [f"--pretrained_model_name_or_path={tmp_path / 'models' / 'model.safetensors'}",
            f"--train_data_dir={tmp_path / 'data'}", "--resolution=64", f"--output_dir={tmp_path / 'out'}",
            f"--logging_dir={tmp_path / 'logs'}", f"--tokenizer_cache_dir={tmp_path / 'tokenizers'}",
            f"--log_tracker_config={tracker}", f"--vae={tmp_path / 'vae.safetensors'}", "--log_config",
            "--network_module=networks.lora", "--optimizer_args", "weight_decay=0.1", f"state_dir={tmp_path / 'opt'}",
            f"--sample_prompts={tmp_path / 'prompts.txt'}"]
    cfg, _ = parse_train_args(argv)
    logged = tracker_config(cfg)
    leaked = {k: v for k, v in logged.items() if str(tmp_path) in str(v) or str(Path.home()) in str(v)}
    assert not leaked
    assert logged["pretrained_model_name_or_path"] == "model.safetensors" and logged["tokenizer_cache_dir"] == "tokenizers"
    assert "state_dir=opt" in logged["optimizer_args"] and "weight_decay=0.1" in logged["optimizer_args"]
