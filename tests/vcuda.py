"""An emulated CUDA device on a CPU-only torch, so that the code moepress runs only on a GPU runs in CI.

Tensors on "cuda:0" are CPU tensors wrapped in :class:`VCuda`, whose device reads cuda:0. What fails on a
real GPU fails here too: a CPU tensor (dim > 0) beside a device tensor in one op, ``.numpy()`` of a device
tensor, a device index into a CPU tensor. The arithmetic is the CPU's, except CUDA's division by a CPU scalar
(a multiplication by the scalar's reciprocal, :func:`_div_by_cpu_scalar`); CUDA's other rounding (its
reductions, matmuls, attention kernels) is not modelled. Copies are synchronous (a non_blocking copy read
before a synchronize is not caught), and autograd is off (moepress computes under no_grad).

    import vcuda; vcuda.install()           # in the process that runs the stage
    vcuda.SYNCS                             # host syncs on device tensors, by call site
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import traceback
import types
import weakref
from pathlib import Path

import torch
import torch.utils._device as _devmod
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _leaves(x, out=None) -> list:
    """Every leaf of nested tuples / lists / dicts (torch's pytree, without its per-node registry lookups: this
    runs on every op of an emulated run, and the pytree calls were a quarter of its time)."""
    out = [] if out is None else out
    if isinstance(x, (tuple, list)):
        for v in x:
            _leaves(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _leaves(v, out)
    else:
        out.append(x)
    return out


def tree_flatten(x):
    return _leaves(x), None


def tree_map(fn, x):
    """``fn`` on every leaf, the containers rebuilt (named tuples and torch.return_types by their own type)."""
    t = type(x)
    if t is tuple or t is list:
        return t(tree_map(fn, v) for v in x)
    if t is dict:
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, tuple):
        items = [tree_map(fn, v) for v in x]
        return t(*items) if hasattr(x, "_fields") else t(items)
    if isinstance(x, (list, dict)):
        raise TypeError(f"vcuda: unexpected container {t}")
    return fn(x)
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
SYNCS: collections.Counter = collections.Counter()
ROOT = str(Path(__file__).resolve().parents[1])
_mem = {"live": {}, "cur": 0, "peak": 0}
# CUDA's lazy initialisation: a device tensor, a stream or torch.cuda.init() starts it; before that the
# allocator's reset_peak_memory_stats refuses the device (torch 2.13 torch/cuda/memory.py calls the C binding
# without _lazy_init; CUDACachingAllocator's assertValidDevice: "Invalid device argument 0: did you call init?")
# and memory_stats reads {} (its is_initialized() check)
_state = {"initialized": False}


def _init() -> None:
    _state["initialized"] = True
_memlock = threading.Lock()


def _is_cuda(d) -> bool:
    if d is None:
        return False
    if isinstance(d, int):
        return True  # a bare index is a CUDA ordinal
    try:
        return torch.device(d).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def _site() -> str:
    for fr in reversed(traceback.extract_stack()[:-2]):
        if fr.filename.startswith(ROOT) and "/.venv/" not in fr.filename and "/tests/" not in fr.filename:
            return f"{fr.filename[len(ROOT) + 1:]}:{fr.lineno}"
    return "?"


def _release(key, nbytes):
    with _memlock:
        n = _mem["live"].get(key)
        if n is None:
            return
        if n[1] <= 1:
            del _mem["live"][key]
            _mem["cur"] -= n[0]
        else:
            n[1] -= 1


class VCuda(torch.Tensor):
    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", (type(elem), elem.device)
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, dtype=elem.dtype, device=CUDA, strides=elem.stride(),
            storage_offset=elem.storage_offset(), requires_grad=elem.requires_grad, layout=elem.layout)
        r.elem = elem
        _state["initialized"] = True
        st = elem.untyped_storage()
        key, nb = st.data_ptr(), st.nbytes()
        with _memlock:
            n = _mem["live"].setdefault(key, [nb, 0])
            if n[1] == 0:
                _mem["cur"] += nb
                _mem["peak"] = max(_mem["peak"], _mem["cur"])
            n[1] += 1
        weakref.finalize(r, _release, key, nb)
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self, **kw):
        return f"VCuda({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        has_v = any(isinstance(a, VCuda) for a in flat)
        if func is aten._to_copy.default:
            src, tgt = args[0], kwargs.pop("device", None)
            out = func(_un(src), **kwargs)
            to_cuda = _is_cuda(tgt) if tgt is not None else isinstance(src, VCuda)
            if to_cuda and out is _un(src):
                out = out.clone()
            return VCuda(out) if to_cuda else out
        if func is aten.copy_.default:
            if isinstance(args[0], VCuda):
                args[0].elem.copy_(_un(args[1]), **kwargs)
            else:
                args[0].copy_(_un(args[1]))
            return args[0]
        if func is aten._local_scalar_dense.default:
            SYNCS[("item", _site())] += 1
        elif func is aten.nonzero.default:
            SYNCS[("nonzero", _site())] += 1
        elif func in _SYNCING_OPS and has_v:
            SYNCS[(_SYNCING_OPS[func], _site())] += 1
        if func in DIVS and isinstance(args[0], VCuda) and _cpu_scalar(args[1]) and not kwargs:
            out = _div_by_cpu_scalar(func, args[0], args[1])
            if out is not None:
                return out
        if func is aten.histc.default and not args[0].dtype.is_floating_point:  # CUDA has an integer histc
            return VCuda(func(_un(args[0]).float(), *args[1:], **kwargs).to(args[0].dtype))
        if func is aten._fused_sdp_choice.default:
            return 0  # the math backend, as torch picks for a CPU tensor
        if has_v:
            _refuse_mixed(func, args, flat)
        wrap = has_v
        if "device" in kwargs:
            wrap = _is_cuda(kwargs["device"])
            kwargs["device"] = CPU
        out = func(*tree_map(_un, args), **tree_map(_un, kwargs))
        if not wrap:
            return out
        ins = {id(_un(a)): a for a in flat if isinstance(a, VCuda)}
        return tree_map(lambda t: _rewrap(ins, t), out)


def _refuse_mixed(func, args, flat) -> None:
    """CUDA's rule: every tensor of an op on one device, except 0-dim CPU scalars and host indices."""
    exempt = set()
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
        if not isinstance(args[0], VCuda):
            raise RuntimeError(f"device mismatch in {func}: indices should be either on cpu or on the "
                               "same device as the indexed tensor (cpu)")
        exempt = {id(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)}
    bad = [a for a in flat if type(a) is torch.Tensor and a.device.type == "cpu" and a.dim() > 0
           and id(a) not in exempt]
    if bad:
        raise RuntimeError(f"device mismatch in {func}: Expected all tensors to be on the same device, "
                           f"but found at least two devices, cuda:0 and cpu! (cpu shape {tuple(bad[0].shape)})")


DIVS = {aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar, aten.div_.Scalar}


def _cpu_scalar(b) -> bool:
    return isinstance(b, (int, float)) or (type(b) is torch.Tensor and b.device.type == "cpu" and b.dim() == 0)


def _div_by_cpu_scalar(func, a: VCuda, b):
    """``a / b`` as CUDA computes it when ``b`` is a CPU scalar: a x (1 / b), the reciprocal and the product in
    the op-math type (float32 for float32, float16, bfloat16), rounded to the result's dtype (PyTorch
    aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu, div_true_kernel_cuda: "if the second operand is a CPU
    scalar, compute a * reciprocal(b)"). None for a non-floating result (integer division is exact)."""
    common = torch.result_type(a.elem, b)
    if not common.is_floating_point:
        return None
    opmath = torch.float64 if common == torch.float64 else torch.float32
    bv = b.item() if isinstance(b, torch.Tensor) else b
    inv = torch.tensor(1.0, dtype=opmath) / torch.tensor(bv, dtype=opmath)
    out = (a.elem.to(opmath) * inv).to(common)
    if func in (aten.div_.Tensor, aten.div_.Scalar):
        a.elem.copy_(out)
        return a
    return VCuda(out)


def _rewrap(ins, t):
    if id(t) in ins:
        return ins[id(t)]
    return VCuda(t) if type(t) is torch.Tensor else t


def _un(t):
    return t.elem if isinstance(t, VCuda) else t


def _wrap_out(out):
    return tree_map(lambda t: VCuda(t) if type(t) is torch.Tensor and not isinstance(t, VCuda) else t, out)


def _to_target(args, kwargs):
    """Tensor.to's target device (None: unchanged)."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            return a
        if isinstance(a, torch.Tensor):
            return a.device
    return None


T = torch.Tensor


def _index(func, self_t, args):
    """``t[i]`` / ``t[i] = v``: CUDA takes host indices (copied over); C++ indexing needs a CUDA guard."""
    idx = args[1] if isinstance(args[1], tuple) else (args[1],)
    adv = any(isinstance(i, (torch.Tensor, list)) for i in idx)
    if isinstance(self_t, VCuda):
        uidx = tuple(_un(i) for i in idx)
        uidx = uidx if isinstance(args[1], tuple) else uidx[0]
        if func is T.__getitem__:
            with torch._C.DisableTorchFunction():
                return VCuda(self_t.elem[uidx])
        val = args[2]
        if adv and type(val) is torch.Tensor and val.dim() > 0:
            raise RuntimeError("device mismatch in index_put_ (setitem): values on cpu, self on cuda:0")
        with torch._C.DisableTorchFunction():
            self_t.elem[uidx] = _un(val)
        return None
    if any(isinstance(i, VCuda) for i in idx):
        raise RuntimeError("device mismatch in indexing: indices should be either on cpu or on the same "
                           "device as the indexed tensor (cpu)")
    if func is T.__setitem__ and isinstance(args[2], VCuda):
        if args[2].dim() > 0 and adv:
            raise RuntimeError("device mismatch in index_put_ (setitem): values on cuda:0, self on cpu")
        with torch._C.DisableTorchFunction():
            self_t[args[1]] = args[2].elem  # a cross-device copy_ is allowed
        return None
    return NotImplemented


def _to_cuda(func, self_t, args, kwargs):
    tgt = _to_target(args, kwargs)
    a = [CPU if (x is tgt and not isinstance(x, torch.Tensor)) else _un(x) for x in args]
    if "device" in kwargs:
        kwargs["device"] = CPU
    kwargs.pop("non_blocking", None)
    with torch._C.DisableTorchFunction():
        out = func(*a, **kwargs)
        if out.untyped_storage().data_ptr() == self_t.untyped_storage().data_ptr():
            out = out.clone()
    return VCuda(out.detach()) if not out.requires_grad else VCuda(out)


class VCudaMode(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self_t = args[0] if args else None
        if func is T.numpy and isinstance(self_t, VCuda):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if func is T.tolist and isinstance(self_t, VCuda):
            SYNCS[("tolist", _site())] += 1
            return self_t.elem.tolist()
        if getattr(func, "__name__", "") == "__set__" and len(args) == 2 and isinstance(args[1], VCuda) \
                and not isinstance(args[0], VCuda):
            raise RuntimeError("vcuda (an emulation limit): `plain.data = device tensor` is unsupported")
        if func is T.record_stream:
            return None
        if func is T.pin_memory:
            out = self_t.clone() if not isinstance(self_t, VCuda) else self_t
            out._vc_pinned = True
            return out
        if func is T.is_pinned:
            return bool(getattr(self_t, "_vc_pinned", False))
        if func is T.cuda:
            return self_t if isinstance(self_t, VCuda) else VCuda(self_t.detach().clone())
        if func in (T.__getitem__, T.__setitem__):
            out = _index(func, self_t, args)
            if out is not NotImplemented:
                return out
        if func is T.new_tensor and isinstance(self_t, VCuda):
            return VCuda(self_t.elem.new_tensor(*args[1:], **kwargs))
        if func is T.to and isinstance(self_t, torch.Tensor) and not isinstance(self_t, VCuda) \
                and _is_cuda(_to_target(args, kwargs)):
            return _to_cuda(func, self_t, args, kwargs)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = CPU
            with torch._C.DisableTorchFunction():
                out = func(*tree_map(_un, args), **tree_map(_un, kwargs))
            return _wrap_out(out)
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:  # a C++ binding's CUDA device guard (contiguous, copy_ ...): run it on the host
            if "not linked with support for cuda" not in str(e):
                raise
            return _on_host(func, args, kwargs)


# reads of a device tensor's values on the host that reach _on_host (a C++ binding's CUDA guard), not aten's
# _local_scalar_dense / nonzero below the torch function mode: float(t), int(t), t.nonzero() ...
# ops that wait for the device on CUDA: a bool or a size the host needs, or a solver's error check (linalg's
# non-_ex functions end in _linalg_check_errors; eigh checks its own). Device-to-host copies are not counted.
_SYNCING_OPS = {aten._linalg_check_errors.default: "linalg check", aten._linalg_eigh.default: "eigh",
                aten.equal.default: "equal", aten.allclose.default: "allclose", aten._unique2.default: "unique",
                aten.masked_select.default: "masked_select", aten.repeat_interleave.Tensor: "repeat_interleave",
                aten.bincount.default: "bincount"}
_HOST_READS = {"__float__", "__int__", "__bool__", "__index__", "item", "nonzero", "tolist"}


def _on_host(func, args, kwargs):
    flat = tree_flatten((args, kwargs))[0]
    vs = [a for a in flat if isinstance(a, VCuda)]
    if not vs:
        raise RuntimeError(f"{func}: needs CUDA and was given no device tensor")
    if getattr(func, "__name__", "") in _HOST_READS:
        SYNCS[(func.__name__, _site())] += 1
    if func is not T.copy_ and any(type(a) is torch.Tensor and a.dim() > 0 for a in flat):
        raise RuntimeError(f"device mismatch in {func}: cuda:0 and cpu")
    with torch._C.DisableTorchFunction():
        out = func(*tree_map(_un, args), **tree_map(_un, kwargs))
    if func is T.copy_ and not isinstance(args[0], VCuda):
        return out
    ins = {id(v.elem): v for v in vs}
    return tree_map(lambda t: _rewrap(ins, t), out)


class VCudaFactories(TorchDispatchMode):
    """Factories run by C++ composites with a CUDA device (a scalar wrapped on self's device ...)."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")) and not any(isinstance(a, VCuda) for a in tree_flatten(args)[0]):
            kwargs["device"] = CPU
            return _wrap_out(func(*args, **kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _modes():
    with VCudaMode(), VCudaFactories():
        yield


_orig_dc_tf = _devmod.DeviceContext.__torch_function__


def _dc_tf(self, func, types_, args=(), kwargs=None):
    kwargs = kwargs or {}
    if self.device.type == "cuda" and func in _devmod._device_constructors() and kwargs.get("device") is None:
        return _wrap_out(func(*args, **dict(kwargs, device=CPU)))
    return _orig_dc_tf(self, func, types_, args, kwargs)


class _Stream:
    def __init__(self, device=None, priority=0, **kw):
        _init()
        self.device = CUDA

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, ev):
        pass

    def query(self):
        return True

    def record_event(self, ev=None):
        ev = ev or _Event()
        ev.record(self)
        return ev


class _Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0


_MODE = None
PROPS = types.SimpleNamespace(name="NVIDIA H200 (vcuda)", total_memory=int(141e9), major=9, minor=0,
                              multi_processor_count=132)


def _patch_cuda_module() -> None:
    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: 1
    c.current_device = lambda: 0
    c.set_device = lambda d: None
    c.synchronize = lambda device=None: _init()
    c.is_initialized = lambda: _state["initialized"]
    c._lazy_init = _init
    c.init = _init
    c.Stream = _Stream
    c.Event = _Event
    c.stream = lambda s=None: contextlib.nullcontext()
    c.device = lambda d=None: contextlib.nullcontext()
    c.current_stream = lambda device=None: _Stream()
    c.default_stream = lambda device=None: _Stream()
    c.max_memory_allocated = lambda device=None: _mem["peak"] if _state["initialized"] else 0
    c.memory_allocated = lambda device=None: _mem["cur"] if _state["initialized"] else 0
    c.memory_reserved = lambda device=None: _mem["cur"] if _state["initialized"] else 0
    c.max_memory_reserved = lambda device=None: _mem["peak"] if _state["initialized"] else 0

    def _reset(device=None):
        if not _state["initialized"]:
            raise RuntimeError("Invalid device argument 0: did you call init?")
        _mem["peak"] = _mem["cur"]
    c.reset_peak_memory_stats = _reset
    c.reset_max_memory_allocated = _reset
    c.mem_get_info = lambda device=None: (PROPS.total_memory - _mem["cur"], PROPS.total_memory)
    c.get_device_name = lambda device=None: PROPS.name
    c.get_device_properties = lambda device=None: PROPS
    c.get_device_capability = lambda device=None: (9, 0)
    c.is_bf16_supported = lambda *a, **k: True
    c.empty_cache = lambda: None
    c.manual_seed = lambda s: None
    c.manual_seed_all = lambda s: None


def install() -> None:
    """Emulate one CUDA device in this process (every thread, from now on)."""
    global _MODE
    if _MODE is not None:
        return
    _patch_cuda_module()
    _devmod.DeviceContext.__torch_function__ = _dc_tf

    def record_stream(self, stream):  # the C binding would refuse the emulated stream object
        if not isinstance(self, VCuda):
            raise RuntimeError("record_stream: expected a CUDA tensor, got a cpu one")
    torch.Tensor.record_stream = record_stream
    orig_compat = torch._has_compatible_shallow_copy_type

    def _has_compatible_shallow_copy_type(input: torch.Tensor, from_: torch.Tensor) -> bool:
        if isinstance(input, VCuda) or isinstance(from_, VCuda):
            return type(input) is type(from_)
        return orig_compat(input, from_)
    torch._has_compatible_shallow_copy_type = _has_compatible_shallow_copy_type
    _MODE = (VCudaMode(), VCudaFactories())
    for m in _MODE:
        m.__enter__()
    torch.set_grad_enabled(False)  # autograd on a wrapped "cuda" tensor aborts in C++ (no CUDA device guard)
    orig_run = threading.Thread.run

    def run(self):  # torch function modes are per thread: every thread gets the emulation
        torch.set_grad_enabled(False)
        with _modes():
            orig_run(self)
    threading.Thread.run = run
