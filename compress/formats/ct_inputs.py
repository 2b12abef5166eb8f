"""Input decoders for compressed-tensors checkpoints (Kimi K2 Thinking / K2.5 / K2.6, llm-compressor
outputs): a module ``P`` stored as ``P.weight_packed`` + ``P.weight_scale`` (+ ``P.weight_shape``,
``P.weight_global_scale``, ``P.weight_zero_point``) read back as one float weight.

Three compressed-tensors formats, told apart by the stored dtypes (compressed-tensors 0.20.1):

* ``pack-quantized`` (compressors/pack_quantized/base.py, helpers.py): ``weight_packed`` I32, element
  ``i`` of a row at bits ``[i*b, i*b + b)`` of the row's little-endian bit stream (4-bit: 8 values a
  word, the first in the low nibble), stored as ``q + 2**(b-1)``; ``weight_shape`` I64 [out, in];
  ``weight_scale`` [out, in/group] (channel: [out, 1]); asymmetric schemes add ``weight_zero_point``
  packed the same way along dim 0. Dequantized as the library does (quantization/lifecycle/
  forward_helpers.py ``_dequantize``): ``(q.to(scale.dtype) - zp) * scale`` in the scale's dtype.
  Kimi ships symmetric INT4, group 32, BF16 scales (moonshotai/Kimi-K2-Thinking config.json).
* ``nvfp4-pack-quantized`` (compressors/nvfp4/base.py): ``weight_packed`` U8 [out, in/2] E2M1 pairs,
  ``weight_scale`` F8_E4M3 per 16, ``weight_global_scale`` F32 [1]; weight = e2m1 * (scale / global).
* ``mxfp4-pack-quantized`` (compressors/mxfp4/base.py, mx_utils.py): the same bytes with
  ``weight_scale`` U8 E8M0 per 32 and no global scale.

Both FP4 forms are decoded with the library's arithmetic (``NVFP4PackedCompressor.decompress``:
values and scales in bf16, ``scale / global_scale`` in float32, the product rounded to bf16), so the
reader's weights equal the library's decompression bit for bit (tests/test_inputs_ct.py).

The checkpoint reader exposes ``P.weight`` for every ``P.weight_packed`` (:func:`packed_aliases`) so
that the layer stream asks for the weight by its module name; the stored tensors stay what is
copied when a stage keeps them as they are (pruning).
"""

from __future__ import annotations

import math

import torch

from moepress.compress.quant import fp4
from moepress.compress.quant.fp8 import FP8_DTYPE
from moepress.errors import MoepressError

PACKED = ".weight_packed"
CT_PACKED = "pack-quantized"
CT_NVFP4 = "nvfp4-pack-quantized"
CT_MXFP4 = "mxfp4-pack-quantized"
_FP4_BLOCK = {CT_NVFP4: 16, CT_MXFP4: 32}  # values per weight_scale: NVFP4 E4M3 per 16, MXFP4 E8M0 per 32


def packed_aliases(names) -> dict[str, str]:
    """{``P.weight``: ``P.weight_packed``} for each packed module among the stored ``names``."""
    return {n[: -len(PACKED)] + ".weight": n for n in names if n.endswith(PACKED)}


def ct_format(reader, base: str) -> str | None:
    """The compressed-tensors format module ``base`` is stored in (from its stored dtypes), or None."""
    if base + PACKED not in reader:
        return None
    info = reader.info(base + PACKED)
    if info.dtype == "I32":
        return CT_PACKED
    if info.dtype == "U8" and base + ".weight_scale" in reader:
        return CT_MXFP4 if reader.info(base + ".weight_scale").dtype == "U8" else CT_NVFP4
    raise MoepressError(f"{reader.path}: tensor '{base}{PACKED}' is {info.dtype}; expected I32 (pack-quantized) or "
                        "U8 (nvfp4- / mxfp4-pack-quantized) with a weight_scale")


def _weight_args(reader) -> list[dict]:
    qc = reader.config.get("quantization_config") or {}
    groups = qc.get("config_groups") or {}
    return [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]


def _num_bits(reader, base: str, in_f: int, words: int) -> int:
    """Bits per value: the one width whose dense packing of ``in_f`` values takes ``words`` int32s
    (unique for in_features >= 32), else the config group's ``num_bits``."""
    fits = [b for b in range(1, 9) if -(-in_f * b // 32) == words]
    if len(fits) == 1:
        return fits[0]
    declared = {int(w["num_bits"]) for w in _weight_args(reader) if w.get("num_bits")} & set(fits)
    if len(declared) == 1:
        return declared.pop()
    raise MoepressError(f"{reader.path}: tensor '{base}{PACKED}' has {words} int32 words per row for {in_f} values; "
                        "expected a pack-quantized width of 1..8 bits named by quantization_config.config_groups")


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Rows of densely packed ``bits``-bit values (int32 words) -> int8 [rows, n], offset removed
    (compressed-tensors ``unpack_from_int32`` along dim 1)."""
    rows = packed.shape[0]
    if bits == 4:  # two values per byte, low nibble first (little-endian words)
        b = packed.contiguous().view(torch.uint8)
        v = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(rows, -1)[:, :n]
    else:
        words = packed.to(torch.int64) & 0xFFFFFFFF
        pos = torch.arange(n, dtype=torch.int64, device=packed.device) * bits  # on the words' device
        w, off = pos // 32, pos % 32
        lo = words[:, w] >> off
        nxt = words[:, (w + 1).clamp(max=words.shape[1] - 1)]
        hi = torch.where(off + bits > 32, nxt << (32 - off), torch.zeros_like(nxt))
        v = (lo | hi) & ((1 << bits) - 1)
    return (v.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _grouped(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale`` [out, G] (checked by :func:`_group_of`) or one value, expanded over ``x`` [out, in]."""
    if scale.numel() == 1:
        return scale.reshape(1, 1)
    return scale.repeat_interleave(x.shape[1] // scale.shape[1], dim=1)


def _group_of(reader, base: str, name: str, shape, out_f: int, in_f: int, groups: set[int]) -> int:
    """The group width of module ``base``'s ``name`` [out, in / group] (one value: the tensor strategy,
    group = in); refused unless ``in_f`` is whole groups of a width in ``groups`` (the config's, or the
    format's fixed one; any width when empty), as compressed-tensors' own decompression requires
    (quantization/lifecycle/forward.py _process_quantization, 0.20.1)."""
    shape = list(shape)
    if math.prod(shape) == 1:
        return in_f
    g = in_f // shape[1] if len(shape) == 2 and shape[1] and in_f % shape[1] == 0 else None
    if shape[0] != out_f or g is None or (shape[1] > 1 and groups and g not in groups):
        widths = " or ".join(map(str, sorted(groups))) or "a width that divides in_features"
        raise MoepressError(f"{reader.path}: tensor '{base}{name}' has shape {shape}; expected [{out_f}, {in_f} / "
                            f"group] with group {widths} for a [{out_f}, {in_f}] weight")
    return g


def decode_pack_quantized(reader, base: str) -> torch.Tensor:
    """``pack-quantized`` INT module -> weight in its scale's dtype (compressed-tensors' result)."""
    packed, scale = reader.get(base + PACKED), reader.get(base + ".weight_scale")
    out_f, in_f = _weight_shape(reader, base, packed.shape, scale.shape)
    if packed.ndim != 2 or packed.shape[0] != out_f:
        raise MoepressError(f"{reader.path}: tensor '{base}{PACKED}' has shape {list(packed.shape)}; "
                            f"expected [{out_f}, words] for weight_shape [{out_f}, {in_f}]")
    if not scale.is_floating_point():
        raise MoepressError(f"{reader.path}: tensor '{base}.weight_scale' is {scale.dtype}; expected a float dtype")
    _check_g_idx(reader, base, in_f, _group_of(reader, base, ".weight_scale", scale.shape, out_f, in_f,
                                                _declared_groups(reader)))
    bits = _num_bits(reader, base, in_f, packed.shape[1])
    q = unpack_int32(packed, bits, in_f).to(scale.dtype)
    if base + ".weight_zero_point" in reader:
        zp = reader.get(base + ".weight_zero_point")
        if zp.dtype == torch.int32:  # group / channel strategies pack it along dim 0 (PACK_ZP_STRATS)
            words = -(-out_f * bits // 32)
            if zp.ndim != 2 or zp.shape[0] != words or scale.ndim != 2 or zp.shape[1] != scale.shape[1]:
                raise MoepressError(f"{reader.path}: tensor '{base}.weight_zero_point' has shape {list(zp.shape)}; "
                                    f"expected [{words}, {scale.shape[-1]}] (packed along dim 0, as its weight_scale)")
            # a fresh contiguous copy: .contiguous() keeps a [G, 1] transpose's stride (G, not 1), which view refuses
            zp = unpack_int32(zp.t().clone(memory_format=torch.contiguous_format), bits, out_f).t()
        elif tuple(zp.shape) != tuple(scale.shape):
            raise MoepressError(f"{reader.path}: tensor '{base}.weight_zero_point' has shape {list(zp.shape)}; "
                                f"expected {list(scale.shape)}, as its weight_scale")
        q = q - _grouped(q, zp.to(scale.dtype))
    asymmetric = base + ".weight_zero_point" in reader and bool((zp != 0).any())  # older releases stored zeros
    _check_declared(reader, base, bits, list(scale.shape), asymmetric, in_f)
    return q * _grouped(q, scale)


def _check_declared(reader, base: str, bits: int, scale_shape: list[int], has_zp: bool, in_f: int) -> None:
    """Refuse a module no config group's weights describe: compressed-tensors decompresses by the config
    (compressors/pack_quantized/base.py decompress, 0.20.1: num_bits, symmetric, strategy, group_size), so stored
    tensors it does not describe read as other numbers there (``num_bits: 8`` over 4-bit words) or not at all
    (transformers allocates a group scale of ceil(in / group_size) columns and refuses the stored one)."""
    declared = [w for w in _weight_args(reader) if w]  # a group without weights quantizes none
    cols, n = (scale_shape[-1] if scale_shape else 1), math.prod(scale_shape)

    def describes(w: dict) -> bool:  # QuantizationArgs' defaults: 8 bits; strategy group with a group size, else tensor
        strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
        return ((w.get("type") or "int") == "int" and int(w.get("num_bits") or 8) == bits
                and bool(w.get("symmetric", True)) != has_zp
                and not (strategy == "tensor" and n != 1) and not (strategy == "channel" and cols != 1)
                and not (strategy == "group" and w.get("group_size") and cols != -(-in_f // int(w["group_size"]))))

    if declared and not any(describes(w) for w in declared):
        said = "; ".join(f"{w.get('type')} {w.get('num_bits')}-bit "
                         f"{'symmetric' if w.get('symmetric', True) else 'asymmetric'} {w.get('strategy')}"
                         + (f" group_size {w['group_size']}" if w.get("group_size") else "") for w in declared)
        raise MoepressError(f"{reader.path}: tensor '{base}{PACKED}' stores {bits}-bit "
                            f"{'asymmetric' if has_zp else 'symmetric'} int values with a weight_scale of shape "
                            f"{scale_shape}, which no quantization_config.config_groups weights entry describes "
                            f"({said}); compressed-tensors would decode other numbers or refuse it")


def _check_g_idx(reader, base: str, in_f: int, group: int) -> None:
    """Group act-order (``weight_g_idx``: column j scaled by group g_idx[j]), written by older
    llm-compressor releases and no longer read by compressed-tensors (0.20.1 quant_args.py
    validate_actorder: "actorder='group' has been removed"): decoded only where it is the plain order
    (g_idx[j] = j // group), otherwise refused."""
    name = base + ".weight_g_idx"
    if name not in reader:
        return
    g_idx = reader.get(name)
    if tuple(g_idx.shape) == (in_f,) and not g_idx.is_floating_point() and \
            torch.equal(g_idx.long(), torch.arange(in_f, device=g_idx.device) // group):
        return
    raise MoepressError(f"{reader.path}: tensor '{name}': group act-order (columns scaled by groups out of order) "
                        "is not supported; compressed-tensors 0.20 no longer reads it either")


def _weight_shape(reader, base: str, packed_shape, scale_shape) -> tuple[int, int]:
    """[out, in] of a pack-quantized module: its ``weight_shape``, else from the packing and the
    config's one group size."""
    if base + ".weight_shape" not in reader:
        return packed_shape[0], scale_shape[-1] * _group_size(reader)
    ws = reader.get(base + ".weight_shape")  # on the host where the layer is on a GPU (stream.py HOST_SUFFIXES)
    vals = ws.tolist()
    if ws.numel() != 2 or ws.is_floating_point() or min(vals) < 1:
        raise MoepressError(f"{reader.path}: tensor '{base}.weight_shape' is {vals}; expected two positive "
                            "integers [out_features, in_features]")
    out_f, in_f = (int(v) for v in vals)
    return out_f, in_f


def _declared_groups(reader) -> set[int]:
    """The group sizes quantization_config.config_groups declare (compressed-tensors QuantizationArgs)."""
    return {int(w["group_size"]) for w in _weight_args(reader) if w.get("group_size")}


def _group_size(reader) -> int:
    sizes = _declared_groups(reader)
    if len(sizes) != 1:
        raise MoepressError(f"{reader.path}: a pack-quantized weight without weight_shape needs one "
                            "quantization_config group_size; found " + (", ".join(map(str, sorted(sizes))) or "none"))
    return sizes.pop()


def decode_fp4_packed(reader, base: str, fmt: str) -> torch.Tensor:
    """``nvfp4-`` / ``mxfp4-pack-quantized`` -> bf16 weight, with the library's decompress arithmetic."""
    packed, scale = reader.get(base + PACKED), reader.get(base + ".weight_scale")
    if packed.ndim != 2:
        raise MoepressError(f"{reader.path}: tensor '{base}{PACKED}' has shape {list(packed.shape)}; expected "
                            "[out_features, in_features / 2]")
    block = _FP4_BLOCK[fmt]
    if _group_of(reader, base, ".weight_scale", scale.shape, packed.shape[0], 2 * packed.shape[1], {block}) != block:
        raise MoepressError(f"{reader.path}: tensor '{base}.weight_scale' has shape {list(scale.shape)}; expected "
                            f"one scale per {block} values ([{packed.shape[0]}, {2 * packed.shape[1] // block}])")
    x = fp4.unpack_values(packed, dtype=torch.bfloat16)  # unpack_fp4_from_uint8 (default dtype bf16)
    if fmt == CT_MXFP4:
        s = 2.0 ** (scale.to(torch.int32) - fp4.E8M0_BIAS).to(torch.bfloat16)  # mx_utils.decompress_mx_scale
    else:
        if scale.dtype != FP8_DTYPE:
            raise MoepressError(f"{reader.path}: tensor '{base}.weight_scale' is {scale.dtype}; expected "
                                "float8_e4m3fn (nvfp4-pack-quantized) or uint8 E8M0 (mxfp4-pack-quantized)")
        s = scale.to(torch.bfloat16)
    if base + ".weight_global_scale" in reader:
        s = s / reader.get(base + ".weight_global_scale").float()  # forward_helpers._dequantize
    return (x * _grouped(x, s)).to(torch.bfloat16)


def decode_native(reader, base: str) -> torch.Tensor | None:
    """The weight of a compressed-tensors packed module in the dtype the library decompresses it to
    (the scale's for pack-quantized: Kimi's bf16; bf16 for FP4); None if ``base`` is not one."""
    fmt = ct_format(reader, base)
    if fmt is None:
        return None
    return decode_pack_quantized(reader, base) if fmt == CT_PACKED else decode_fp4_packed(reader, base, fmt)


def decode(reader, base: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight of a compressed-tensors packed module in ``dtype``; None if ``base`` is not one."""
    w = decode_native(reader, base)
    return None if w is None else w.to(dtype)


COMPANIONS = (PACKED, ".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_global_scale",
              ".input_global_scale", ".weight_g_idx")


def as_modules(names) -> list[str]:
    """Stored tensor names with each packed module's tensors replaced by one ``P.weight`` (which the
    reader serves decoded): what a stage that rewrites a checkpoint in another format copies."""
    names = list(names)
    bases = {n[: -len(PACKED)] for n in names if n.endswith(PACKED)}
    out = set()
    for n in names:
        sfx = next((s for s in COMPANIONS if n.endswith(s) and n[: -len(s)] in bases), None)
        out.add(n if sfx is None else n[: -len(sfx)] + ".weight")
    return sorted(out)


def describe(reader, base: str) -> str | None:
    """A one-phrase label of how module ``base`` is stored (``inspect``), or None if plainly."""
    fmt = ct_format(reader, base)
    if fmt is None:
        return None
    scale = reader.info(base + ".weight_scale").shape
    packed = reader.info(base + PACKED).shape
    if fmt == CT_PACKED:
        out_f, in_f = _weight_shape(reader, base, packed, scale)  # header shapes: inspect reads no weights
        group = _group_of(reader, base, ".weight_scale", scale, out_f, in_f, _declared_groups(reader))
        bits = _num_bits(reader, base, in_f, packed[-1])
        sym = "asymmetric" if base + ".weight_zero_point" in reader else "symmetric"
        return f"int{bits} {sym} group {group} (compressed-tensors {fmt})"
    group = _group_of(reader, base, ".weight_scale", scale, packed[0], 2 * packed[-1], {_FP4_BLOCK[fmt]})
    return f"{fmt.split('-')[0]} group {group} (compressed-tensors {fmt})"


DECODERS = (decode,)
