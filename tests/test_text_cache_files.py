"""--cache_text_encoder_outputs_to_disk: sd-scripts' npz files per image, checked and reused, the encoders not built.

Every registered family trains twice on its tiny model: the first run writes one file per image with the keys
sd-scripts' loaders read (`strategy_sdxl/sd3/flux.py`: `is_disk_cached_outputs_expected`, `load_outputs_npz`),
holding what the family's own encoders give; the second run builds no text encoder at all and its losses are
the first run's.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from helpers import write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.config import parse_train_args
from lorakit.data.build import build_train_dataset
from lorakit.data.text_cache import CaptionCache, PendingFile, plan_text_cache
from lorakit.data.text_files import TextFileFormat, is_valid, text_request, write_text_file
from lorakit.errors import ConfigError
from lorakit.families.registry import family_names, fixtures, get_family
from lorakit.training import distributed
from lorakit.training.run import train

#: what sd-scripts' loader of each family requires in a file (its validity check), and the switches it compares
SD_SCRIPTS_KEYS = {
    "sdxl": ("_te_outputs.npz", {"hidden_state1", "hidden_state2", "pool2"}, set()),
    "sd3": ("_sd3_te.npz", {"lg_out", "lg_pooled", "t5_out", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask"},
            {"apply_lg_attn_mask", "apply_t5_attn_mask"}),
    "flux": ("_flux_te.npz", {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask"}, {"apply_t5_attn_mask"}),
}
_MODELS: dict[str, list[str]] = {}


def model_args(name: str, root: Path) -> list[str]:
    if name not in _MODELS:
        _MODELS[name] = fixtures(name).bench_files("tiny", root / name)[0]
    return _MODELS[name]


def options(name: str, models: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--family={name}", *model_args(name, models), f"--train_data_dir={data}", "--resolution=64",
            f"--output_dir={out}", "--output_name=tiny", "--network_dim=4", "--network_alpha=2", "--max_train_steps=2",
            "--learning_rate=1e-3", "--seed=3", "--max_data_loader_n_workers=0", "--network_train_unet_only",
            "--cache_text_encoder_outputs_to_disk", *extra]


def refuse_text_encoders(monkeypatch) -> None:
    """Every text encoder is a transformers model: from now on building one (from a folder or a file) fails."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was built although every caption's outputs are cached")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)


def fresh_outputs(cfg, name: str, captions: list[str]) -> dict[str, torch.Tensor]:
    """The family's own encoders on the captions, loaded for the run's options."""
    family = get_family(name)
    comps = family.load(cfg)
    with torch.no_grad():
        return family.text_encoder_outputs(comps, captions)


@pytest.mark.parametrize("name", family_names())
def test_second_run_reads_the_files_without_building_encoders(name, tmp_path_factory, tmp_path, capsys, monkeypatch):
    models = tmp_path_factory.getbasetemp() / "text_cache_models"
    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    cfg, _ = parse_train_args(options(name, models, data, tmp_path / "first"))
    first = train(cfg).step_losses
    assert "text encoders     loaded (2 " in capsys.readouterr().out

    fmt = get_family(name).text_cache_format
    images = sorted((data / "1_sks toy").glob("*.png"))
    files = [Path(f"{image.with_suffix('')}{fmt.suffix}") for image in images]
    assert all(f.is_file() for f in files)
    stored = [dict(np.load(f)) for f in files]
    assert all(set(fmt.keys) <= set(s) for s in stored)
    if name in SD_SCRIPTS_KEYS:
        _check_sd_scripts_keys(name, stored, files)
    fresh = fresh_outputs(cfg, name, [f"sks toy, a square number {i}" for i in range(2)])
    for index, row in enumerate(stored):
        for key in fmt.keys:
            torch.testing.assert_close(torch.from_numpy(row[key]), fresh[key][index].to(torch.from_numpy(row[key]).dtype))
    refuse_text_encoders(monkeypatch)
    cfg, _ = parse_train_args(options(name, models, data, tmp_path / "second"))
    second = train(cfg).step_losses
    assert "text encoders     not loaded: every caption's outputs are cached" in capsys.readouterr().out
    assert second == first and len(second) == 2


def _check_sd_scripts_keys(name: str, stored: list[dict], files: list[Path]) -> None:
    """The names, dtypes and shapes sd-scripts' loader reads (it stacks float32 outputs per batch)."""
    suffix, keys, switches = SD_SCRIPTS_KEYS[name]
    assert all(f.name.endswith(suffix) for f in files)
    for row in stored:
        assert keys | switches <= set(row)
        assert all(row[s].dtype == np.bool_ and row[s].shape == () and not row[s] for s in switches)
        assert all(row[k].dtype == np.float32 for k in keys if "mask" not in k)
    row = stored[0]
    if name == "sdxl":
        assert row["hidden_state1"].shape[0] == row["hidden_state2"].shape[0] == 77 and row["pool2"].ndim == 1
    elif name == "sd3":
        assert row["lg_out"].shape[0] == 77 and row["clip_l_attn_mask"].shape == row["clip_g_attn_mask"].shape == (77,)
        assert row["t5_attn_mask"].shape == row["t5_out"].shape[:1] and row["lg_pooled"].ndim == 1
    else:
        length = row["t5_out"].shape[0]
        assert row["txt_ids"].shape == (length, 3) and not row["txt_ids"].any() and row["t5_attn_mask"].shape == (length,)


def test_a_changed_caption_invalidates_only_its_own_file(tmp_path_factory, tmp_path):
    name = family_names()[-1]
    models = tmp_path_factory.getbasetemp() / "text_cache_models"
    data = write_dreambooth_folder(tmp_path / "data", count=3, repeats=1)
    cfg, _ = parse_train_args(options(name, models, data, tmp_path / "out"))
    fmt = get_family(name).text_cache_format
    before = plan_text_cache(cfg, build_train_dataset(cfg), fmt)
    assert len(before.pending) == 3 and before.needs_encoders
    for item in before.pending:  # as a run would write them (the outputs do not matter here)
        write_text_file(item.path, item.request, {key: torch.zeros(2) for key in fmt.keys})
    assert not plan_text_cache(cfg, build_train_dataset(cfg), fmt).needs_encoders
    (data / "1_sks toy" / "img_001.caption").write_text("sks toy, another caption", encoding="utf-8")
    after = plan_text_cache(cfg, build_train_dataset(cfg), fmt)
    assert [p.path.name for p in after.pending] == [f"img_001{fmt.suffix}"]
    assert [p.caption for p in after.pending] == ["sks toy, another caption"] and after.needs_encoders
    assert len(after.files) == 2


def test_lorakit_cache_writes_the_files_and_then_loads_no_encoder(tmp_path_factory, tmp_path, capsys, monkeypatch):
    name = "flux" if "flux" in family_names() else family_names()[0]
    models = tmp_path_factory.getbasetemp() / "text_cache_models"
    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    argv = ["cache", *options(name, models, data, tmp_path / "out")]
    assert main(argv) == 0
    assert "2 written now, 0 captions already cached" in capsys.readouterr().out
    fmt = get_family(name).text_cache_format
    assert len(list(data.rglob(f"*{fmt.suffix}"))) == 2
    refuse_text_encoders(monkeypatch)
    assert main(argv) == 0
    assert "0 written now, 2 captions already cached and valid; the text encoders were not loaded" in capsys.readouterr().out


# -- the files' rules, without a model ---------------------------------------------------------------------------

FORMAT = TextFileFormat("_x_te.npz", ("out", "mask"), switches=("apply_t5_attn_mask",), settings=("t5xxl_max_token_length",),
                        encoder_files=("t5xxl",))


def run_options(**changes) -> SimpleNamespace:
    base = dict(pretrained_model_name_or_path="model.safetensors", t5xxl="t5.safetensors", apply_t5_attn_mask=False,
                t5xxl_max_token_length=None)
    return SimpleNamespace(**{**base, **changes})


def test_files_go_stale_when_what_made_them_changes(tmp_path):
    path = tmp_path / "a_x_te.npz"
    request = text_request(run_options(), FORMAT, "a caption")
    write_text_file(path, request, {"out": torch.ones(3, 2, dtype=torch.bfloat16), "mask": torch.ones(3, dtype=torch.int64)})
    with np.load(path) as stored:
        assert stored["out"].dtype == np.float32 and stored["mask"].dtype == np.int64  # bfloat16 stored as float32
        assert stored["apply_t5_attn_mask"].dtype == np.bool_
    assert is_valid(path, request, FORMAT)
    for changed in (dict(apply_t5_attn_mask=True), dict(t5xxl_max_token_length=128), dict(t5xxl="other.safetensors"),
                    dict(pretrained_model_name_or_path="other")):
        assert not is_valid(path, text_request(run_options(**changed), FORMAT, "a caption"), FORMAT), changed
    assert not is_valid(path, text_request(run_options(), FORMAT, "another caption"), FORMAT)
    assert is_valid(path, text_request(run_options(), FORMAT, "another caption"), FORMAT, skip_check=True)


def test_files_sd_scripts_wrote_are_checked_as_sd_scripts_checks_them(tmp_path):
    """No caption or encoder keys: the keys and the switches decide (a changed caption goes unnoticed there)."""
    path = tmp_path / "a_x_te.npz"
    np.savez(path, out=np.ones((3, 2), np.float32), mask=np.ones(3, np.int64), apply_t5_attn_mask=False)
    assert is_valid(path, text_request(run_options(), FORMAT, "any caption"), FORMAT)
    assert not is_valid(path, text_request(run_options(apply_t5_attn_mask=True), FORMAT, "any caption"), FORMAT)
    np.savez(path, out=np.ones((3, 2), np.float32), apply_t5_attn_mask=False)
    assert not is_valid(path, text_request(run_options(), FORMAT, "any caption"), FORMAT)  # a key is missing
    path.write_bytes(b"half a file")
    assert not is_valid(path, text_request(run_options(), FORMAT, "any caption"), FORMAT)


def test_processes_write_their_own_share_then_read_them_all(tmp_path):
    """Two processes: each writes every second pending file (after all have checked them), then both read all."""
    captions = [f"caption {i}" for i in range(5)]
    pending = [PendingFile(c, tmp_path / f"img{i}_x_te.npz", text_request(run_options(), FORMAT, c)) for i, c in enumerate(captions)]
    encoded: dict[int, list[str]] = {0: [], 1: []}
    caches = [CaptionCache(FORMAT, {}, list(pending)) for _ in range(2)]
    for rank, cache in enumerate(caches):
        def encode(texts, rank=rank):
            encoded[rank] += texts
            return {"out": torch.stack([torch.full((2,), float(t[-1])) for t in texts]), "mask": torch.ones(len(texts), 2)}

        accelerator = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0,
                                      wait_for_everyone=lambda: None)
        assert distributed.cache_text_outputs(cache, accelerator, encode, batch_size=2) == (3 if rank == 0 else 2)
    assert sorted(encoded[0] + encoded[1]) == captions and not set(encoded[0]) & set(encoded[1])
    for cache in caches:
        assert not cache.pending and len(cache.files) == 5
        rows = cache.outputs(["caption 3", "caption 0"], lambda texts: pytest.fail("nothing is encoded again"))
        assert rows["out"][:, 0].tolist() == [3.0, 0.0]


def test_varying_captions_in_a_dataset_file_are_refused(tmp_path_factory, tmp_path, capsys):
    name = family_names()[-1]
    models = tmp_path_factory.getbasetemp() / "text_cache_models"
    data = write_dreambooth_folder(tmp_path / "data", count=1, repeats=1)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{data / "1_sks toy"}"\n'
                    'caption_extension = ".caption"\ncaption_dropout_rate = 0.1\n', encoding="utf-8")
    argv = [a for a in options(name, models, data, tmp_path / "out", f"--dataset_config={toml}")
            if not a.startswith("--train_data_dir")]
    cfg, _ = parse_train_args(argv)
    with pytest.raises(ConfigError, match="changes its captions per step"):
        train(cfg)
