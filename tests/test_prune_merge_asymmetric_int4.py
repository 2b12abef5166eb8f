"""--method merge on an asymmetric compressed-tensors pack-quantized input (packed weight_zero_point) is refused up
front, naming the zero point, before any calibration data is read (prune_checkpoint's contract for ``batches`` passed
as a function): the refusal came from re-quantizing layer 1's first kept expert, after layer 0 was copied and layer 1's
statistics gathered, naming the layout "pack-quantized as [128, 8] with scale [128, 2]" instead of the zero point."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moepress import models
from moepress.compress.prune import PruneConfig, prune_checkpoint
from moepress.errors import MoepressError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_kimi_int4  # noqa: E402


def _asym_kimi(out: Path) -> Path:
    """tiny-deepseek-v3 with routed experts as compressed-tensors asymmetric INT4 group 32 (library-made)."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    src = models.path("tiny-deepseek-v3")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=32, observer="minmax"))
    comp = BaseCompressor.get_value_from_registry("pack-quantized")
    tensors = {}
    for f in sorted(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())):
        with safe_open(str(src / f), "pt") as h:
            for n in h.keys():
                t = h.get_tensor(n)
                if make_kimi_int4.ROUTED.search(n):
                    g = t.reshape(t.shape[0], -1, 32)
                    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
                    st = comp.compress({"weight": t, "weight_scale": scale, "weight_zero_point": zp}, scheme)
                    tensors.update({f"{n[:-7]}.{k}": v.contiguous() for k, v in st.items()})
                else:
                    tensors[n] = t
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text()) | {"model_type": "kimi_k2"}
    (out / "config.json").write_text(json.dumps(conf))
    ModelCompressor(quantization_config=QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", ignore=make_kimi_int4.KIMI_IGNORE,
        quantization_status=QuantizationStatus.COMPRESSED)).update_config(str(out))
    for f in make_kimi_int4.COPIED:
        shutil.copyfile(src / f, out / f)
    return out


def test_merge_of_asymmetric_int4_is_refused_up_front_naming_the_zero_point(tmp_path):
    src = _asym_kimi(tmp_path / "asym")
    read = []

    def batches():
        read.append(1)
        return [torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))]

    with pytest.raises(MoepressError) as e:
        prune_checkpoint(src, tmp_path / "out", PruneConfig(method="merge", ratio=0.5), batches=batches)
    said = str(e.value).split("/asym: ", 1)[-1]  # without the path: the pytest folder holds the test's name
    assert "zero_point" in said or "zero point" in said or "asymmetric" in said, said
    assert not read, f"refused only after calibration data was read: {said}"
