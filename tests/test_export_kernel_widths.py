"""The 128x128 block-FP8 shape rules of exporters/kernel_widths.py against the readers they stand for.

transformers (integrations/finegrained_fp8.py) derives a dense weight's block from its scale grid
(block rows = rows // scale rows); the runtimes quantize activations in 1x128 groups (input % 128) and
their fused MoE needs whole 128-row expert blocks. A shape every consumer reads alike is ``block_ok``.
"""

import math

import pytest

from moepress.exporters.kernel_widths import block_ok, fp4_widths_ok, runs_in_blocks


def _transformers_block_rows(rows: int) -> int:
    """The block height transformers reads from a [rows, ...] weight with a ceil(rows / 128)-row scale grid."""
    return rows // math.ceil(rows / 128)


@pytest.mark.parametrize("rows", [64, 128, 192, 320, 384, 576])
def test_dense_block_fp8_needs_a_grid_transformers_reads_as_128_rows(rows):
    # one partial block (<= 128 rows) reads the same everywhere; above that transformers must see 128-row blocks
    reads_alike = rows <= 128 or _transformers_block_rows(rows) == 128
    assert runs_in_blocks((rows, 256), is_routed=False)  # the runtimes take any dense output
    assert block_ok((rows, 256), is_routed=False) is reads_alike


@pytest.mark.parametrize("inp", [64, 192, 200])
def test_block_fp8_needs_whole_128_wide_input_groups(inp):
    # per-token activation groups of 128: vLLM / SGLang assert x.shape[-1] % 128 == 0
    assert not runs_in_blocks((256, inp), is_routed=False) and not block_ok((256, inp), is_routed=True)
    assert runs_in_blocks((256, 256), is_routed=True)


# Marlin's thread configs (K, N) (vllm csrc/quantization/marlin/marlin.cu: "Invalid thread config" otherwise)
MARLIN = ((128, 128), (64, 128), (128, 64), (64, 256))


def _marlin_runs(k: int, n: int) -> bool:
    return any(k % tk == 0 and n % tn == 0 for tk, tn in MARLIN)


@pytest.mark.parametrize("hidden", [64, 128, 192, 256, 320])
def test_fp4_expert_widths_are_those_marlin_and_trtllm_run(hidden):
    # gate / up: K = hidden, N = 2 x width; down: K = width, N = hidden; TensorRT-LLM packs both in 64s
    for width in range(32, 513, 32):
        runs = (hidden % 64 == 0 and width % 64 == 0 and _marlin_runs(hidden, 2 * width)
                and _marlin_runs(width, hidden))
        assert fp4_widths_ok(hidden, width) is runs, (hidden, width)
