"""A calibration-free quantize's resume key holds none of the calibration settings (they change
no byte: a recipe resumed with another calib section, seed or sample count must resume), nor calib_content / device;
a calibrated one holds them all."""
from __future__ import annotations

import torch

from moepress import models
from moepress.compress.quantize import QuantConfig
from moepress.compress.quantize.config import CALIBRATION_FIELDS
from moepress.compress.quantize.stage import quantize_resume_key


def test_calibration_free_key_ignores_calibration_settings():
    src = models.path("tiny-qwen3-moe")
    a = quantize_resume_key(QuantConfig(format="fp8-block"), src, torch.device("cpu"))
    b = quantize_resume_key(QuantConfig(format="fp8-block", num_samples=4, seq_len=32, seed=3, batch_size=2,
                                        sequential=True), src, torch.device("cuda"))
    assert a == b
    assert not set(a["config"]) & {*CALIBRATION_FIELDS, "calib_content", "device"}, a["config"]


def test_calibrated_key_holds_calibration_settings_and_device():
    src = models.path("tiny-qwen3-moe")
    k = quantize_resume_key(QuantConfig(format="fp8", num_samples=4), src, torch.device("cpu"))
    assert {*CALIBRATION_FIELDS, "calib_content", "device"} <= set(k["config"]) and k["config"]["device"] == "cpu"
    assert k != quantize_resume_key(QuantConfig(format="fp8", num_samples=8), src, torch.device("cpu"))
