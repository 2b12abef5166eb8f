"""Layer-streamed model: embeddings -> each decoder layer (load, run every batch, free) -> norm -> head.

Memory is the decoder layer being run, the next one's stored tensors being read ahead, and the
activations of the batches in flight, whatever the model's size. Stages drive the loop themselves
(``embed`` / ``layers`` / ``run_layer`` / ``head``) or use :meth:`StreamedModel.forward` with callbacks
where observers and transforms attach.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import CheckpointReader, LayerView
from moepress.compress.checkpoint.buffers import BufferPool
from moepress.compress.formats import fake_quant
from moepress.compress.moe import DecoderLayer, StoredLinear
from moepress.device import Uploader
from moepress.errors import MoepressError
from moepress.memwatch import bound_heap

# Tensors stored next to a weight by quantized formats; a layer module has no parameter for them, the checkpoint's
# weight decoders consume them.
COMPANION_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale",
                      ".weight_packed", ".weight_shape", ".weight_zero_point", ".k_scale", ".v_scale",
                      ".weight_global_scale", ".input_global_scale")
HOST_SUFFIXES = (".weight_shape",)  # companions a decoder reads as numbers (each decode): on the host, not a GPU
LayerCallback = Callable[[int, DecoderLayer], None]
# stored dtypes of linear weights a keep_stored stream keeps as stored and decodes at each call
# (StoredLinear.keep): FP8 (DeepSeek / Kimi K2 block FP8, Model-Optimizer FP8), packed INT4 (compressed-tensors
# pack-quantized: Kimi K2 Thinking's experts), packed FP4 (MXFP4, NVFP4)
KEPT_QUANTIZED = ("F8_E4M3", "I32", "U8")

READ_AHEAD_BYTES = 256 << 20


def check_shape(where: str, name: str, got, expected: tuple[int, ...]) -> None:
    """A stored (or decoded) tensor's shape against the one config.json implies: a one-line refusal naming it."""
    if tuple(got) != tuple(expected):
        raise MoepressError(f"{where}: tensor '{name}' has shape {list(got)}, config.json implies {list(expected)}")


def read_ahead_budget(reader: CheckpointReader, share: int = 4, floor: int = 16 << 20) -> int:
    """How far to read ahead: 1/``share`` of the largest stored layer, ``floor``-256 MB (keeps the disk
    busy while a layer computes). ``floor=0`` (a stage bound to stored layers): the share, however small."""
    largest = max((sum(reader.info(n).nbytes for n in reader.layer_names(i)) for i in reader.layer_indices()),
                  default=0)
    return int(min(max(largest // share, floor), READ_AHEAD_BYTES))


def read_ahead(reader: CheckpointReader, names: Iterable[str], budget: int = READ_AHEAD_BYTES,
               threads: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, stored tensor)`` for ``names`` in order while ``threads`` background threads
    read the next ones (independent preads, GIL released: they overlap the caller's compute and keep
    several requests at the disk), until ``budget`` bytes are in flight (so up to one tensor past it; at
    least one tensor), into a :class:`BufferPool` that recycles the blocks the caller frees (at most
    ``budget`` bytes idle).
    ``names`` may be a lazy iterable spanning layers: layer i+1 is read while layer i computes."""
    it = iter(names)
    queue: deque[tuple[str, int, Future]] = deque()
    inflight = 0
    buffers = BufferPool(budget)
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="moepress-readahead")

    def fill() -> None:
        nonlocal inflight
        while not queue or inflight < budget:
            n = next(it, None)
            if n is None:
                return
            nb = reader.info(n).nbytes
            queue.append((n, nb, pool.submit(reader.get, n, buffers)))
            inflight += nb

    try:
        fill()
        while queue:
            n, nb, fut = queue.popleft()
            t = fut.result()
            del fut  # the tensor is the caller's to free
            inflight -= nb
            fill()
            yield n, t
            del t
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _OnDevice:
    """A reader whose ``get`` returns the stored tensor on the uploader's device (activation scales for fake quant)."""

    def __init__(self, reader: CheckpointReader, uploader: Uploader):
        self._reader, self._uploader = reader, uploader

    def get(self, name: str) -> torch.Tensor:
        return self._uploader.upload({name: self._reader.get(name)})[name]

    def __getattr__(self, attr):
        return getattr(self._reader, attr)

    def __contains__(self, name: str) -> bool:
        return name in self._reader


class StreamedModel:
    """A checkpoint seen as a stream of decoder layers.

    ``dtype`` is the compute dtype (float32 for exact comparisons); router tensors that the
    family keeps in float32 stay float32. ``keep_stored=True``: linear weights stay in the layer as
    stored (:class:`StoredLinear`, same results): bf16 (half the memory of a float32 stream) and
    quantized ones (FP8, packed INT4 / FP4) with their scales, decoded at each call (a quarter, an
    eighth); big checkpoints need it to stay within ~2x a stored layer. For a stage that reads weights
    only through :meth:`StoredLinear.stored_weight` and rewrites one by encoding it anew (quantize;
    prune, whose fold re-encodes a merged expert; check and calib stats read none).
    ``read_ahead_bytes``: how far the background reader runs ahead of the layer being built.
    ``release_layers=True``: a layer :meth:`layers` yielded goes to the meta device when the next is
    asked for, before that one is built from its (read-ahead) stored tensors (the caller's loop variable
    still names it then); tensors taken out of it (``state_dict()`` given to a writer) stay valid.
    ``on_build``: (reader, prefix, layer) callbacks as each layer is built (check: a runtime's activation quant).
    ``device``: where layers are built and hidden states live (moepress/device.py resolves it);
    on a GPU each layer's stored bytes are uploaded (:class:`Uploader`) while the previous layer
    computes, decoded there, and logits come back to the host; on the CPU the stored tensors are used as read.
    """

    def __init__(self, source: str | CheckpointReader, *, dtype: torch.dtype = torch.float32,
                 prefetch: bool = True, keep_stored: bool = False,
                 read_ahead_bytes: int | None = None,
                 release_layers: bool = False, device: torch.device | str | None = None):
        self.ckpt = source if isinstance(source, CheckpointReader) else CheckpointReader(source)
        self.to(device)
        self.adapter = get_adapter(self.ckpt.config, self.ckpt.names(), where=str(self.ckpt.path / "config.json"))
        self.dtype = dtype
        self.prefetch = prefetch
        self.keep_stored = keep_stored
        self.read_ahead_bytes = read_ahead_bytes
        self.release_layers = release_layers
        bound_heap(sum(self.ckpt.bytes_by_dtype().values()))
        self._linear_keys: dict[int, set[str]] = {}
        self._kept: dict[str, dict[str, torch.Tensor]] = {}  # read_layer_state -> build_layer (keep)
        self._shapes: dict[tuple, tuple[dict[str, tuple[int, ...]], set[str]]] = {}  # by adapter.layer_shape_key
        self._rotary = None
        self._pos_cache: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.on_build: list[Callable[[CheckpointReader, str, DecoderLayer], None]] = []  # (reader, prefix, layer)
        self.check_weights()

    def to(self, device: torch.device | str | None) -> StreamedModel:
        """Build later layers on ``device`` (None: the CPU); returns self."""
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.uploader = Uploader(self.device, host=HOST_SUFFIXES)
        self._on_device = _OnDevice(self.ckpt, self.uploader)
        self._rotary, self._pos_cache = None, {}
        self._masks: dict[tuple, torch.Tensor] = {}  # (length, device) -> sliding-window mask
        return self

    @property
    def config(self) -> dict:
        return self.ckpt.config

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    # ---- validation ----------------------------------------------------------------------------
    def _where(self) -> str:
        return str(self.ckpt.path)

    def check_weights(self) -> None:
        """Cheap structural check of config against the shard headers (no tensor data read)."""
        a, ck = self.adapter, self.ckpt
        if not ck.has_weights:
            raise MoepressError(f"{self._where()}: no weights found; expected model.safetensors or its index")
        top = [(a.embed_name, (a.vocab_size, a.hidden_size)), (a.norm_name, (a.hidden_size,))]
        if not (a.tie_word_embeddings and a.head_name not in ck):
            top.append((a.head_name, (a.vocab_size, a.hidden_size)))
        for name, shape in top:
            if name not in ck:
                raise MoepressError(f"{self._where()}: tensor '{name}' is missing from the checkpoint")
            if (got := self._stored_shape(name)) is not None:
                check_shape(self._where(), name, got, shape)
        missing = sorted(set(range(a.num_layers)) - set(ck.layer_indices()))
        if missing:
            raise MoepressError(f"{self._where()}: config.json has num_hidden_layers={a.num_layers} "
                                f"but the weights lack layer(s) {missing[:5]}")
        moe = set(a.moe_layers()) | {i for i in a.mtp_layers() if a.is_moe_layer(i)}  # an MTP layer's too
        for i in [*range(a.num_layers), *a.mtp_layers()]:
            pat = re.compile(rf"{re.escape(a.layer_prefix(i) + a.ffn_attr)}\.experts\.(\d+)\.")
            found = {int(m.group(1)) for n in ck.layer_names(i) if (m := pat.match(n))}
            miscounted = len(found) != a.num_experts or (found and max(found) != a.num_experts - 1)
            if (i in moe and miscounted) or (i not in moe and found):  # a dense one named with the keys deciding it
                said = f"says {a.experts_key()}={a.num_experts}" if i in moe else f"makes layer {i} dense"
                raise MoepressError(f"{self._where()}: config.json {said}{a.layer_kind(i not in moe)} but layer {i} "
                                    f"stores {len(found)} routed experts"
                                    + (f", numbered {min(found)}..{max(found)}" if found else ""))
        for i in range(a.num_layers):
            self.check_layer_shapes(i)

    def check_layer_shapes(self, i: int) -> None:
        """Layer i's stored tensors against its layer module's names and shapes, from the shard headers alone (refused
        before any work; ``in``: stored, or served by a decoder; a tensor stored packed: its shape when decoded)."""
        prefix = self.adapter.layer_prefix(i)
        for key, shape in self.expected_layer_shapes(i).items():
            name = prefix + key
            if name not in self.ckpt:
                raise MoepressError(f"{self._where()}: tensor '{name}' is missing from the checkpoint")
            if (got := self._stored_shape(name)) is not None:
                check_shape(self._where(), name, got, shape)

    def _stored_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a plain or FP8 tensor from its header; None where the stored form differs (packed)."""
        info = self.ckpt.info(name)
        if info.dtype in ("U8", "I8", "I32") and name.endswith(".weight"):
            return None
        return info.shape

    def expected_layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Layer i's parameter shapes, keyed as in its module (one meta layer per :meth:`Adapter.layer_shape_key`)."""
        key = self.adapter.layer_shape_key(i)
        if key not in self._shapes:
            with torch.device("meta"):
                layer = self.adapter.build_layer(i)
            linear = {f"{n}.weight" for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            self._shapes[key] = ({k: tuple(v.shape) for k, v in layer.state_dict().items()}, linear)
        shapes, self._linear_keys[i] = self._shapes[key]
        return dict(shapes)

    # ---- pieces ---------------------------------------------------------------------------------
    def _read(self, name: str, view=None) -> torch.Tensor:
        src = view if view is not None else self.ckpt
        dtype = torch.float32 if self.adapter.keep_fp32(name) else self.dtype
        if view is None and not self.uploader.on_cpu:  # stored bytes to the device, decoded there
            view = LayerView(self.ckpt, self.uploader.upload(self._stored_of(name)))
            src = view
        return src.weight(name, dtype) if name.endswith(".weight") else src.get(name).to(dtype)

    def read_tensor(self, name: str) -> torch.Tensor:
        """Stored tensor ``name`` in the compute dtype (routers the family keeps float32), decoded, on its device."""
        return self._read(name)

    def _stored_of(self, name: str, view: LayerView | None = None) -> dict[str, torch.Tensor]:
        """``name`` and its companions (scales) as stored: what decoding it on a device needs."""
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        src = view if view is not None else self.ckpt
        # names the files hold (a packed weight's ``.weight`` is an alias the reader decodes: not stored)
        return {n: src.get(n) for n in [name] + [stem + s for s in COMPANION_SUFFIXES]
                if n in self.ckpt and self.ckpt.info(n).name == n}

    def read_layer_raw(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors as stored (what the prefetch thread reads ahead)."""
        return {n: self.ckpt.get(n) for n in self.ckpt.layer_names(i)}

    def read_layer_state(self, i: int, raw: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The layer's tensors, dequantized to the compute dtype, keyed as in the layer module."""
        prefix = self.adapter.layer_prefix(i)
        self.check_layer_shapes(i)
        expected = self.expected_layer_shapes(i)
        stored = self.ckpt.layer_names(i)
        view = LayerView(self.ckpt, raw) if raw is not None else None
        unbuilt = {n + ".weight" for n in self.adapter.zero_width_linears(i)}  # transformers saves them empty
        extra = [n for n in stored if n[len(prefix):] not in expected and not n.endswith(COMPANION_SUFFIXES)
                 and not (n in unbuilt and 0 in self.ckpt.info(n).shape)]
        if extra:
            raise MoepressError(f"{self._where()}: tensor '{extra[0]}' does not belong to a {self.adapter.family} "
                                f"layer as config.json describes it")
        state = {}
        for key, shape in expected.items():
            name = prefix + key  # in the checkpoint: check_layer_shapes
            stored = self.ckpt.info(name).dtype if self.keep_stored and key in self._linear_keys[i] else None
            if stored == "BF16" and self.dtype != torch.bfloat16:
                t = (view or self.ckpt).get(name)  # as stored; StoredLinear casts at each call
                t = self.uploader.upload({name: t})[name] if view is None else t
            elif stored in KEPT_QUANTIZED and self.dtype == torch.float32 \
                    and not self.adapter.keep_fp32(name):
                # as stored with its scales (StoredLinear.keep, in build_layer); the state holds its shape only
                raw = self._stored_of(name, view)
                if self._stored_shape(name) is None:  # packed: its decoded shape, checked once (FP8: the header's)
                    check_shape(self._where(), name, LayerView(self.ckpt, raw).weight(name).shape, shape)
                self._kept[name] = raw if view is not None else self.uploader.upload(raw)
                t = torch.empty(shape, dtype=torch.float8_e4m3fn, device="meta")
            else:
                t = self._read(name, view)
            check_shape(self._where(), name, t.shape, shape)
            state[key] = t
        return state

    def build_layer(self, i: int, state: dict[str, torch.Tensor]) -> DecoderLayer:
        with torch.device("meta"):
            layer = self.adapter.build_layer(i)
        layer.load_state_dict(state, assign=True, strict=True)
        prefix, kept, self._kept = self.adapter.layer_prefix(i), self._kept, {}
        for n, m in layer.named_modules():
            if type(m) is nn.Linear and m.weight.dtype != self.dtype:
                m.__class__ = StoredLinear
                if f"{prefix}{n}.weight" in kept:
                    m.keep(self.ckpt, f"{prefix}{n}.weight", kept[f"{prefix}{n}.weight"])
        # a quantized checkpoint's layer runs its activation fake-quant: the stream is its forward
        for attach in (fake_quant.prepare_layer, *self.on_build):
            attach(self.ckpt if self.uploader.on_cpu else self._on_device, prefix, layer)
        return layer.eval()

    def load_layer(self, i: int) -> DecoderLayer:
        raw = None if self.uploader.on_cpu else self.uploader.upload(self.read_layer_raw(i))
        return self.build_layer(i, self.read_layer_state(i, raw))

    def layers(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, DecoderLayer]]:
        """Yield (i, layer) with weights loaded; layer i+1 is read in the background while i runs."""
        stop = self.num_layers if stop is None else stop
        if not self.prefetch:
            for i in range(start, stop):
                yield i, (layer := self.load_layer(i))
                self._release(layer)
                del layer
            return
        for i, box in self.uploader.ahead(self._raw_layers(start, stop)):
            state = self.read_layer_state(i, box.pop())  # the raw tensors live on only as the state
            layer = self.build_layer(i, state)
            del state
            yield i, layer
            self._release(layer)  # before the next layer is read: the caller's loop variable still holds it
            del layer

    def _release(self, layer: DecoderLayer) -> None:
        if self.release_layers:  # parameters and buffers replaced by meta tensors
            layer.to("meta")

    def _raw_layers(self, start: int, stop: int) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
        """(i, [layer i's stored tensors]) read in the background: a bounded distance ahead
        (``read_ahead_bytes``) or the whole next layer. The list is the caller's to empty, so this
        generator holds no reference while the layer is built and used."""
        if self.read_ahead_bytes is not None:
            names = {i: self.ckpt.layer_names(i) for i in range(start, stop)}
            tensors = read_ahead(self.ckpt, (n for i in range(start, stop) for n in names[i]), self.read_ahead_bytes)
            try:
                for i in range(start, stop):
                    yield i, [dict(next(tensors) for _ in names[i])]
            finally:
                tensors.close()
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepress-prefetch") as pool:
            nxt: Future | None = pool.submit(self.read_layer_raw, start) if start < stop else None
            for i in range(start, stop):
                box = [nxt.result()]
                nxt = pool.submit(self.read_layer_raw, i + 1) if i + 1 < stop else None
                yield i, box

    def embed(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Input embeddings in the compute dtype. A float table is gathered as stored and the rows cast (a cast
        commutes with a gather; a packed table reads as its integer dtype): no float32 copy (Kimi K2: 4.7 GB)."""
        name = self.adapter.embed_name
        stored = self._stored_of(name)  # the table and its companions as the files hold them
        as_stored = list(stored) == [name] and stored[name].dtype in (torch.bfloat16, torch.float16, torch.float32)
        w = self.uploader.upload(stored)[name] if as_stored else self._read(name)
        dtype = torch.float32 if self.adapter.keep_fp32(name) else self.dtype
        for b in batches:
            if bad := [v for v in (b.aminmax() if b.numel() else ()) if not 0 <= int(v) < w.shape[0]]:
                raise MoepressError(f"token id {int(bad[0])} out of range for vocab_size {w.shape[0]}")
        return [F.embedding(b.to(w.device), w).to(dtype) for b in batches]

    def position_embeddings(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h.shape[1], h.dtype)
        if key not in self._pos_cache:
            if self._rotary is None:
                self._rotary = self.adapter.build_rotary().to(self.device)
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            self._pos_cache[key] = self._rotary(h, pos)
        return self._pos_cache[key]

    @torch.no_grad()
    def run_layer(self, layer: DecoderLayer, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(h, self.position_embeddings(h), self.attention_mask(h)) for h in hs]

    def attention_mask(self, h: torch.Tensor) -> torch.Tensor | None:
        """None (causal attention) unless the config's ``sliding_window`` is shorter than the sequence:
        then the sliding-window causal mask transformers builds for Mixtral / Qwen3-MoE
        (masking_utils.create_sliding_window_causal_mask: key within ``sliding_window`` positions
        before the query), as a boolean [B, 1, S, S] (True: attended)."""
        w = getattr(self.adapter.hf_config, "sliding_window", None)
        s = h.shape[1]
        if w is None or s <= w:
            return None
        key = (s, h.device)
        if key not in self._masks:  # made once per length, not per layer and batch
            pos = torch.arange(s, device=h.device)
            d = pos[:, None] - pos[None, :]
            self._masks[key] = ((d >= 0) & (d < w))[None, None]
        return self._masks[key].expand(h.shape[0], 1, s, s)

    def head_weights(self) -> tuple[torch.nn.Module, torch.Tensor]:
        a = self.adapter
        norm = a.build_norm(a.hidden_size).to(self.device)
        norm.weight.data = self._read(a.norm_name)
        head = a.head_name if a.head_name in self.ckpt else a.embed_name
        return norm, self._read(head)

    @torch.no_grad()
    def head(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits per batch, on the host (computed on the device)."""
        norm, w = self.head_weights()
        return [F.linear(norm(h), w).cpu() for h in hs]

    @torch.no_grad()
    def forward(self, batches: list[torch.Tensor], *, before_layer: LayerCallback | None = None,
                after_layer: Callable[[int, DecoderLayer, list[torch.Tensor]], None] | None = None,
                ) -> list[torch.Tensor]:
        """Logits for each batch of token ids [B, S], streaming layers once for all batches."""
        hs = self.embed(batches)
        for i, layer in self.layers():
            if before_layer is not None:
                before_layer(i, layer)
            hs = self.run_layer(layer, hs)
            if after_layer is not None:
                after_layer(i, layer, hs)
            del layer  # not held while the next layer is built
        return self.head(hs)
