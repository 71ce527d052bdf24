"""Bucket sizes and bucket choice against values computed by hand from sd-scripts' rules."""

from __future__ import annotations

import logging

import pytest

from lorakit.data.buckets import (
    BucketManager, adjust_bucket_limits, cover_size, make_bucket_resolutions, round_to_steps,
    select_no_upscale_bucket, select_predefined_bucket,
)

# 512x512, sides 256..1024, step 64: max area 262144; height = min(1024, floor(262144 // w / 64) * 64).
BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
    (1024, 256),
]


def test_bucket_resolutions_512():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == BUCKETS_512


def test_bucket_resolutions_are_within_area_and_steps():
    for w, h in make_bucket_resolutions((1024, 1024), 256, 2048, 64):
        assert w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h)


@pytest.mark.parametrize("x, expected", [(0, 0), (63.4, 0), (63.5, 64), (100, 64), (127.6, 128), (591.2, 576)])
def test_round_to_steps(x, expected):
    assert round_to_steps(x, 64) == expected


def test_adjust_bucket_limits_rounds_min_down_and_max_up_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert adjust_bucket_limits(300, 1000, 64) == (256, 1024)
    assert "min_bucket_reso 300" in caplog.text and "max_bucket_reso 1000" in caplog.text
    assert adjust_bucket_limits(256, 1024, 64) == (256, 1024)


@pytest.mark.parametrize("size, bucket, resized", [
    ((512, 512), (512, 512), (512, 512)),      # exact bucket
    ((1024, 768), (576, 448), (597, 448)),     # ar 1.333 -> 1.286; wider: 1024*448/768 = 597.3
    ((300, 200), (640, 384), (640, 427)),      # ar 1.5 -> 1.667; taller, so widths match (upscaled)
    ((100, 2000), (256, 1024), (256, 5120)),   # extreme portrait: narrowest bucket, crop the height
    ((4000, 100), (1024, 256), (10240, 256)),  # extreme landscape
    ((64, 64), (512, 512), (512, 512)),        # smaller than every bucket: upscaled to cover
])
def test_select_bucket_upscale(size, bucket, resized):
    choice = select_predefined_bucket(*size, BUCKETS_512)
    assert choice.bucket == bucket and choice.resized_size == resized
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    assert choice.resized_size[0] >= bucket[0] and choice.resized_size[1] >= bucket[1]


@pytest.mark.parametrize("size, bucket, resized", [
    ((300, 200), (256, 192), (300, 200)),      # fits in the area: never resized, floored to steps
    ((100, 70), (64, 64), (100, 70)),
    ((1024, 768), (512, 384), (512, 384)),     # shrunk: height-rounded candidate has exact ar
    ((4000, 100), (2560, 64), (2560, 64)),     # extreme: rh 81 -> 64, width 64*40
    ((512, 512), (512, 512), (512, 512)),
])
def test_select_bucket_no_upscale(size, bucket, resized):
    choice = select_no_upscale_bucket(*size, 512 * 512, 64)
    assert choice.bucket == bucket and choice.resized_size == resized


def test_cover_size_covers_bucket():
    for w, h in [(37, 91), (1000, 999), (640, 480), (17, 3000)]:
        for bucket in BUCKETS_512:
            rw, rh = cover_size(w, h, bucket)
            assert rw >= bucket[0] and rh >= bucket[1]


def test_manager_without_bucketing_has_one_bucket():
    manager = BucketManager((512, 512), enable_bucket=False)
    choice = manager.select(1024, 768)
    assert choice.bucket == (512, 512) and choice.resized_size == (683, 512)
    assert manager.select(256, 256).resized_size == (512, 512)


def test_manager_modes():
    assert BucketManager((512, 512), True, False, 256, 1024, 64).select(1024, 768).bucket == (576, 448)
    assert BucketManager((512, 512), True, True, 256, 1024, 64).select(1024, 768).bucket == (512, 384)
