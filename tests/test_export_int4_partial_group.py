"""Packed INT4 whose in_features is not a whole number of scale groups, yet whose floor(in_features / columns)
IS a group size (194 over 3 columns: 64, 64, 66; 129 over 2: 64, 65), is refused by exporters/linears.py
read_linear (the cases 160/2 = 80 and 129/3 = 43 are refused by the group-size rule alone)."""
import pytest
import torch


@pytest.mark.parametrize("groups,width", [(3, 194), (2, 129)])
def test_int4_partial_last_group_of_a_group_size_is_refused(tmp_path, groups, width):
    from safetensors.torch import save_file

    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.quant import int4
    from moepress.errors import MoepressError
    from moepress.exporters.linears import read_linear

    assert width % groups and width // groups == 64  # hand-checked: a partial last group, floor width a group size
    w = torch.randint(-8, 8, (4, width), dtype=torch.int8)
    save_file({"x.weight": int4.pack_int4(w), "x.weight_scale": torch.ones(4, groups)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MoepressError, match=f"'x.weight' has {groups} scale groups over in_features {width}"):
        read_linear(CheckpointReader(tmp_path), "x")
