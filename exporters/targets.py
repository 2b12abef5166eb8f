"""GPU targets: one frozen :class:`Target` per NVIDIA GPU, and which formats each can run.

Sources (checked 2026-11):
- Formats per architecture: TensorRT-LLM ``docs/source/features/quantization.md``, "Hardware
  Support Matrix" (https://nvidia.github.io/TensorRT-LLM/features/quantization.html):

  ===================== ===== ===== ====== ======== ======= ====== ======== ========= =========
  arch                  NVFP4 MXFP4 FP8/T  FP8 blk  FP8 row FP8 KV W4A8 AWQ W4A16 AWQ W4A16 GPTQ
  ===================== ===== ===== ====== ======== ======= ====== ======== ========= =========
  Blackwell sm120       Y     Y     Y      -        -       Y      -        -         -
  Blackwell sm100/103   Y     Y     Y      Y        -       Y      -        -         -
  Hopper sm90           -     -     Y      Y        Y       Y      Y        Y         Y
  Ada sm89              -     -     Y      -        -       Y      Y        Y         Y
  Ampere sm80/86        -     -     -      -        -       Y      -        Y         Y
  ===================== ===== ===== ====== ======== ======= ====== ======== ========= =========

  (read from NVIDIA/TensorRT-LLM docs/source/features/quantization.md at commits 09d4c79b and
  f53fb4c8: both leave the W4A8 / W4A16 AWQ and GPTQ columns empty for Blackwell, so the catalog
  does not offer ``int4-*`` / ``w4a8-awq`` on sm100/sm120 even though Model-Optimizer's matrix
  words the INT4 floors as "Ampere and later": on Blackwell, TensorRT-LLM's 4-bit path is NVFP4.)
  (the same page: "FP8 blockwise scaling GEMM kernels for sm100/103 use the MXFP8 recipe", i.e.
  TensorRT-LLM converts DeepSeek-style 128x128 FP32 scales there). Model-Optimizer's support
  matrix (https://nvidia.github.io/Model-Optimizer/guides/0_support_matrix.html) agrees on the
  floor of each: FP4 Blackwell+, FP8 Ada+, W4A16 Ampere+, W4A8 Ada+.
- moepress format names -> TensorRT-LLM recipes: ``fp8`` = FP8 per tensor, ``fp8-block`` = FP8
  block scaling, ``fp8-dynamic`` = FP8 rowwise (per-channel weights, per-token activations),
  ``int4-awq`` = W4A16 AWQ, ``int4-gptq`` = W4A16 GPTQ, ``w4a8-awq`` = W4A8 AWQ, ``nvfp4`` = NVFP4
  (listed for planning; moepress does not produce it yet). vLLM runs some of these on more
  architectures (e.g. FP8 through Marlin weight-only kernels on sm80); the catalog follows
  TensorRT-LLM, the stack the builders target, except for the weight-only FP4 formats (``mxfp4``,
  ``nvfp4-a16``: Format.archs from sm80, vLLM's Marlin FP4 kernels), which the matrix has on Blackwell only.
- Memory, bandwidth, interconnect: NVIDIA's datasheets (A100: "NVIDIA A100 Tensor Core GPU"
  datasheet; A10G: AWS G5 page; L4, L40S, H100, H200, GH200, B200 (HGX B200), GB200 (GB200 NVL72),
  RTX PRO 6000 Blackwell Server Edition datasheets). Memory is the marketed capacity in GB (1e9).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import moepress.exporters.kv_cache as kv_cache
from moepress.compress import formats
from moepress.errors import MoepressError
from moepress.exporters.kv_cache import KV_CACHE

# the unquantized format (no weight scale): what runs everywhere and what a plan assumes by default
UNQUANTIZED = next(n for n, f in formats.FORMATS.items() if f.scale is None)
# what moepress writes: the unquantized checkpoint and every format `moepress quantize` produces
PRODUCED = tuple(n for n, f in formats.FORMATS.items() if f.produced or n == UNQUANTIZED)

# TensorRT-LLM's hardware support matrix (module docstring; weight-only FP4 as vLLM), by SM: each format declares the SM
# versions that run it (Format.archs); listed in the registry's order
_SM_FORMATS = {sm: tuple(f.name for f in formats.FORMATS.values() if sm in f.archs)
               for sm in (80, 86, 89, 90, 100, 120)}
# the matrix's own rows, in its column names (it includes what moepress does not write: MXFP4,
# W4A8 GPTQ); shown by `moepress targets --json` as ``trtllm_matrix``
_SM_RECIPES = {
    80: ("FP8 KV cache", "W4A16 AWQ", "W4A16 GPTQ"),
    86: ("FP8 KV cache", "W4A16 AWQ", "W4A16 GPTQ"),
    89: ("FP8 per tensor", "FP8 KV cache", "W4A8 AWQ", "W4A16 AWQ", "W4A8 GPTQ", "W4A16 GPTQ"),
    90: ("FP8 per tensor", "FP8 block scaling", "FP8 rowwise", "FP8 KV cache", "W4A8 AWQ", "W4A16 AWQ",
         "W4A8 GPTQ", "W4A16 GPTQ"),
    100: ("NVFP4", "MXFP4", "FP8 per tensor", "FP8 block scaling", "FP8 KV cache"),
    120: ("NVFP4", "MXFP4", "FP8 per tensor", "FP8 KV cache"),
}
# FP8 context FMHA (trtllm-build --use_fp8_context_fmha) has kernels on Ada, Hopper, Blackwell
FP8_FMHA_MIN_SM = 89


@dataclass(frozen=True)
class Target:
    name: str  # catalog key, used by --target
    gpu: str  # marketing name
    arch: str
    sm: int  # compute capability x 10 (sm90 = 9.0)
    memory_gb: float  # per GPU
    bandwidth_gbs: float  # memory bandwidth, GB/s
    interconnect: str  # e.g. "NVLink 4", "PCIe Gen4 x16"
    link_gbs: float  # GPU-to-GPU bandwidth, GB/s (bidirectional NVLink total, or PCIe x16)
    gpus_per_node: int = 8  # largest single-node (NVLink / host) group
    aliases: tuple[str, ...] = ()

    @property
    def compute_capability(self) -> str:
        return f"{self.sm // 10}.{self.sm % 10}"

    @property
    def formats(self) -> tuple[str, ...]:
        return _SM_FORMATS[self.sm]

    @property
    def trtllm_matrix(self) -> tuple[str, ...]:
        return _SM_RECIPES[self.sm]

    @property
    def kv_cache_dtypes(self) -> tuple[str, ...]:
        return kv_cache.for_sm(self.sm)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def supports(self, fmt: str) -> bool:
        return fmt in self.formats

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(compute_capability=self.compute_capability, formats=list(self.formats),
                 trtllm_matrix=list(self.trtllm_matrix),
                 kv_cache_dtypes=list(self.kv_cache_dtypes), aliases=list(self.aliases),
                 kv_cache_dtypes_mla=list(kv_cache.for_sm(self.sm, mla=True)))  # an MLA model's latent cache
        return d


TARGETS: dict[str, Target] = {}


def register_target(t: Target) -> Target:
    TARGETS[t.name] = t
    return t


for _t in (
    # A100 datasheet: 40GB HBM2 1,555 GB/s; 80GB HBM2e 2,039 GB/s; NVLink 3 600 GB/s (SXM)
    Target("a100-40gb", "A100 40GB SXM", "ampere", 80, 40, 1555, "NVLink 3", 600, aliases=("a100-40",)),
    Target("a100-80gb", "A100 80GB SXM", "ampere", 80, 80, 2039, "NVLink 3", 600, aliases=("a100", "a100-80")),
    # A10G (AWS G5): GA102, 24 GB GDDR6, 600 GB/s, no NVLink; g5.48xlarge holds 8
    Target("a10g", "A10G", "ampere", 86, 24, 600, "PCIe Gen4 x16", 64),
    # L4: 24 GB GDDR6, 300 GB/s, PCIe Gen4 x16 (no NVLink); g6.48xlarge holds 8
    Target("l4", "L4", "ada", 89, 24, 300, "PCIe Gen4 x16", 64),
    # L40S: 48 GB GDDR6, 864 GB/s, PCIe Gen4 x16 (no NVLink)
    Target("l40s", "L40S", "ada", 89, 48, 864, "PCIe Gen4 x16", 64),
    # H100 SXM5: 80 GB HBM3, 3.35 TB/s, NVLink 4 900 GB/s
    Target("h100", "H100 SXM", "hopper", 90, 80, 3350, "NVLink 4", 900, aliases=("h100-sxm",)),
    # H100 PCIe: 80 GB HBM2e, 2.0 TB/s, PCIe Gen5 x16 128 GB/s (NVLink bridge pairs: 600 GB/s)
    Target("h100-pcie", "H100 PCIe", "hopper", 90, 80, 2000, "PCIe Gen5 x16", 128),
    # H200 SXM: 141 GB HBM3e, 4.8 TB/s, NVLink 4 900 GB/s
    Target("h200", "H200 SXM", "hopper", 90, 141, 4800, "NVLink 4", 900),
    # GH200 Grace Hopper: 96 GB HBM3, 4 TB/s (the 144 GB HBM3e version: 4.9 TB/s); one GPU per
    # superchip, NVLink-C2C 900 GB/s to Grace; GPUs of several superchips meet over NVLink Switch
    # (NVL32) or InfiniBand, so a "node" here is one GPU
    Target("gh200", "GH200 96GB", "hopper", 90, 96, 4000, "NVLink-C2C + NVLink 4", 900, gpus_per_node=1),
    # HGX B200: 180 GB HBM3e per GPU (1.44 TB for 8), 8 TB/s, NVLink 5 1.8 TB/s
    Target("b200", "B200", "blackwell", 100, 180, 8000, "NVLink 5", 1800),
    # GB200 NVL72: 13.4 TB HBM3e for 72 GPUs (186 GB each), 8 TB/s, NVLink 5 1.8 TB/s; one
    # NVLink domain of 72 GPUs (4 per compute tray)
    Target("gb200", "GB200 (NVL72)", "blackwell", 100, 186, 8000, "NVLink 5, 72-GPU domain", 1800,
           gpus_per_node=72),
    # RTX PRO 6000 Blackwell Server Edition: 96 GB GDDR7, 1,597 GB/s (its datasheet; not re-checked
    # against a stored copy: the Workstation Edition is quoted at 1,792 GB/s = 28 Gbps x 512 bit),
    # PCIe Gen5 x16, no NVLink
    Target("rtx-pro-6000", "RTX PRO 6000 Blackwell", "blackwell", 120, 96, 1597, "PCIe Gen5 x16", 128,
           aliases=("rtx6000-pro", "rtx-pro-6000-blackwell")),
):
    register_target(_t)


def get_target(name: str) -> Target:
    key = name.strip().lower()
    if key in TARGETS:
        return TARGETS[key]
    for t in TARGETS.values():
        if key in t.aliases:
            return t
    raise MoepressError(f"--target {name}: unknown GPU target; expected one of {', '.join(TARGETS)} "
                        f"(see `moepress targets`)")


def min_sm(fmt: str) -> int:
    return min(sm for sm, fs in _SM_FORMATS.items() if fmt in fs)


class FormatRefused(MoepressError):
    """A format the target does not run, as --format asked it: ``why`` (what it needs, what the target is) and
    ``alt`` (the closest format it runs) for the callers that reword it for an export or a recipe key."""

    def __init__(self, fmt: str, why: str, alt: str, suggestion: str, runs: str):
        super().__init__(f"--format {fmt}: {why}: use {suggestion} (it runs {runs})")
        self.fmt, self.why, self.alt = fmt, why, alt


def check_format(target: Target, fmt: str, loads: Callable[[str], bool] | None = None) -> None:
    """Raise a one-line refusal with a suggestion when ``target`` cannot run ``fmt`` (``loads``: which formats
    the suggestion may name, e.g. those whose MoE experts the runtime loads)."""
    if fmt not in formats.FORMATS:
        raise MoepressError(f"--format {fmt}: unknown format; expected one of {', '.join(formats.FORMATS)}")
    if target.supports(fmt):
        return
    where = [sm for sm, fs in _SM_FORMATS.items() if fmt in fs]
    # a format newer GPUs lack is TensorRT-LLM's matrix, not the hardware (vLLM runs W4A16 on Blackwell too)
    need = f"needs sm{min(where)}+" if where == [sm for sm in _SM_FORMATS if sm >= min(where)] else \
        f"runs in TensorRT-LLM on {'/'.join(f'sm{s}' for s in where)} only (its hardware support matrix)"
    alt = suggestion = suggest_format(target, fmt, loads=loads)
    if alt not in PRODUCED:  # a format moepress plans but does not write: name one it writes too
        made = suggest_format(target, fmt, produced_only=True, loads=loads)
        suggestion = f"{alt} (Model-Optimizer writes it; moepress does not yet) or {made}"
    raise FormatRefused(fmt, f"{fmt.upper()} {need}; {target.gpu} is sm{target.sm}", alt, suggestion,
                        ", ".join(target.formats))


def suggest_format(target: Target, fmt: str, produced_only: bool = False,
                   loads: Callable[[str], bool] | None = None) -> str:
    """The closest format ``target`` runs: the format's own alternatives in order (FP8 family first for
    FP8 formats, 4-bit for 4-bit ones: Format.alternatives), else the unquantized format."""
    f = formats.FORMATS.get(fmt)
    for alt in f.alternatives if f is not None else ():
        if target.supports(alt) and (alt in PRODUCED or not produced_only) and (loads is None or loads(alt)):
            return alt
    return UNQUANTIZED


def pick_format(target: Target, bits: int) -> tuple[str, str]:
    """The format moepress writes for ``bits``-bit weights on ``target``, and why (one sentence).

    Among the produced formats of that weight width the target runs (Format.archs), the first whose
    activations are quantized statically to a low-precision element the GPU's tensor cores take
    (NVFP4 on Blackwell: FP4 x FP4 GEMMs, TensorRT-LLM's 4-bit path there), else the first in
    registry order (INT4 weight-only AWQ before Hopper's W4A8, which trades accuracy for speed)."""
    fits = [f for n, f in formats.produced().items() if f.weight_bits == bits and target.supports(n)]
    if not fits:
        raise MoepressError(f"--bits {bits}: {target.gpu} (sm{target.sm}) runs no {bits}-bit weight format moepress "
                            f"writes; it runs {', '.join(target.formats)}")
    native = [f for f in fits if f.element == "fp4" and f.static_input]
    f = (native or fits)[0]
    if native:
        why = (f"{f.name}: sm{target.sm} multiplies FP4 weights by FP4 activations on its tensor cores "
               f"(TensorRT-LLM's 4-bit path on Blackwell); INT4 weight-only kernels are not offered there")
    else:
        others = [g.name for g in fits if g is not f]
        why = (f"{f.name}: the first {bits}-bit format sm{target.sm} runs"
               + (f" (also: {', '.join(others)})" if others else ""))
    return f.name, why


def render(targets=None) -> str:
    """The catalog as a table; under a target, the other names it answers to (``h100-sxm``)."""
    ts = list(targets or TARGETS.values())
    rows = [("target", "GPU", "SM", "memory", "bandwidth", "interconnect", "formats")]
    rows += [(t.name, t.gpu, f"sm{t.sm}", f"{t.memory_gb:g} GB", f"{t.bandwidth_gbs / 1000:g} TB/s",
              f"{t.interconnect} ({t.link_gbs:g} GB/s)", ", ".join(t.formats)) for t in ts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    out = lines[:1]
    for t, line in zip(ts, lines[1:], strict=True):
        out += [line] + ([f"  also: {', '.join(t.aliases)}"] if t.aliases else [])
    return "\n".join(out)


__all__ = ["KV_CACHE", "PRODUCED", "UNQUANTIZED", "Target", "TARGETS", "register_target", "get_target", "check_format",
           "FormatRefused", "suggest_format", "pick_format", "min_sm", "render", "FP8_FMHA_MIN_SM"]
