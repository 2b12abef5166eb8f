"""Several processes over one calibration set (``torchrun --nproc_per_node N -m moepress ...``).

Small helpers that any stage can use: every rank streams the whole model over its own
share of the calibration batches, then the statistics are reduced (sums for routing,
max for activation ranges) and rank 0 alone writes outputs. Splitting by whole batches
keeps each batch exactly as the single-process run forms it, so every per-token number
is bit-identical and only the order of the float64 sums differs.

Backend: NCCL when CUDA is available, else gloo (CPU). Outside torchrun (no
``WORLD_SIZE``) everything is a no-op over one rank.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from moepress.calib.observers import LayerRouting
from moepress.errors import MoepressError, PeerLost

T = TypeVar("T")
PG_TIMEOUT_MIN = 60  # the process group's collective timeout (init)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """Where collectives need their tensors (NCCL: this rank's GPU)."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        raise MoepressError(f"{name}={os.environ[name]!r}: expected an integer (set by torchrun)") from None


def detect() -> DistEnv:
    """The torchrun environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or one rank."""
    world, rank = _int_env("WORLD_SIZE", 1), _int_env("RANK", 0)
    local = _int_env("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise MoepressError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return DistEnv(rank, world, local, None)


def init(backend: str | None = None, device: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (idempotent); one rank when not under torchrun. ``device``: the
    command's --device; ``cpu`` joins with gloo (NCCL put a CUDA context on every GPU of a CPU run)."""
    import torch.distributed as dist

    env = detect()
    if not env.enabled:
        return env
    if backend is None and str(device or "").strip().lower() == "cpu":
        backend = "gloo"
    if backend is None:
        # NCCL wants one GPU per rank on a node; fewer GPUs than local ranks -> gloo on CPU
        local_world = _int_env("LOCAL_WORLD_SIZE", env.world_size)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if dist.is_nccl_available() and gpus >= local_world else "gloo"
    if not dist.is_initialized():
        _rendezvous_env(env)
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        # rank 0 alone may work a long while before the next collective (a resume hashes the kept shards of a
        # partial: ~10 min for a terabyte at 2 GB/s); NCCL's default is 10 min. torchrun's agent, not this
        # timeout, ends the group when a rank dies.
        with _default_signals():
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=PG_TIMEOUT_MIN))
        # no rank leaves the start-up before every rank is through it: init_process_group returns on a rank once
        # its own connections are made, while a peer may still read the others' addresses from the rendezvous
        # store (in rank 0's process when the ranks are started by hand) or finish its gloo handshake. A rank that
        # refuses its input at once (os._exit, :func:`abandon`) would break that peer's start-up, which would then
        # print "Connection reset by peer" and a C++ stack instead of the same one-line refusal. The barrier runs
        # over the group's own connections (torch's TORCH_DIST_INIT_BARRIER goes through the store, whose host
        # may be the rank that leaves).
        with peer_errors(DistEnv(env.rank, env.world_size, env.local_rank, backend)), _default_signals():
            dist.barrier(device_ids=[env.local_rank]) if backend == "nccl" else dist.barrier()
    return DistEnv(env.rank, env.world_size, env.local_rank, dist.get_backend())


@contextlib.contextmanager
def _default_signals():
    """SIGINT and SIGTERM end the process at once while it waits in torch's start-up (the rendezvous store, gloo's
    handshake: C++ that runs no Python signal handler until it returns, up to PG_TIMEOUT_MIN for a peer that never
    comes); nothing is written before it. Their handlers (the CLI's one-line interruption) come back after it; a
    signal the process ignored stays ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, h in kept.items():
        if h not in (signal.SIG_IGN, None):  # None: a handler not set from Python, left alone
            signal.signal(s, signal.SIG_DFL)
    try:
        yield
    finally:
        for s, h in kept.items():
            if h is not None:
                signal.signal(s, h)


def _rendezvous_env(env: DistEnv) -> None:
    """The env:// rendezvous (init_process_group's default) reads RANK, MASTER_ADDR and MASTER_PORT, raising a
    ValueError (a traceback) without them: WORLD_SIZE set by hand or by another launcher. LOCAL_RANK too: each
    rank's GPU (its NCCL group's and its compute device, moepress/device.py) is cuda:LOCAL_RANK."""
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise MoepressError(f"WORLD_SIZE={env.world_size} but {' and '.join(missing)} not set: expected "
                            "torchrun's environment (torchrun sets them all), or no WORLD_SIZE for one process")
    _int_env("MASTER_PORT", 0)


def current() -> DistEnv:
    """The process group already joined, or one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        env = detect()
        return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, dist.get_backend())
    return DistEnv()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def abandon(code: int) -> None:
    """Exit now with ``code``, without tearing the process group down, when one is joined: after a peer is
    lost, gloo's teardown at interpreter exit can abort the process ("terminate called without an active
    exception", SIGABRT) after the one-line error was printed, which would turn the exit status into -6
    instead of ``code``. The stage already kept its partial; nothing else is left to clean up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        import torch.distributed as dist

        with peer_errors(env):
            dist.barrier()


def run_main_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first (e.g. it fills a cache), then on the other ranks.

    If rank 0 fails, the others raise the same one-line error instead of waiting for it.
    """
    if not env.enabled:
        return fn()
    import torch.distributed as dist

    box: list = [None]
    result = None
    if env.is_main:
        try:
            result = fn()
        except MoepressError as e:
            box[0] = str(e)
            dist.broadcast_object_list(box, src=0)
            raise
        except Exception as e:
            box[0] = f"rank 0 failed: {type(e).__name__}: {e}"
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise MoepressError(box[0])
    return fn() if not env.is_main else result


# what a collective raises when a peer is gone (torch 2.13 gloo: a plain RuntimeError "[.../gloo/transport/tcp/
# pair.cc:553] Connection closed by peer"; a store or NCCL timeout: "Timed out", DistError subclasses)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport", "Timed out",
             "timed out")


def _peer_gone(e: BaseException) -> bool:
    import torch.distributed as tdist

    own = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), torch.linalg.LinAlgError) if t)
    if isinstance(e, own):  # this rank's own failure
        return False
    dist_error = getattr(tdist, "DistError", None)
    return (dist_error is not None and isinstance(e, dist_error)) or any(p in str(e) for p in PEER_GONE)


@contextlib.contextmanager
def peer_errors(env: DistEnv):
    """Under torchrun, a collective failing because a peer is gone becomes one line, :class:`PeerLost`,
    which keeps the finished layers for ``--resume``; any other error (this rank's bad input, an
    out-of-memory, a bug) passes through unchanged. (With NCCL a lost peer usually ends the process
    through its watchdog instead: nothing cleans up, so the partial stays too.)"""
    if not env.enabled:
        yield
        return
    try:
        yield
    except RuntimeError as e:
        lost = peer_lost(e, env.rank, env.world_size)
        if lost is None:
            raise
        raise lost from None


def peer_lost(e: RuntimeError, rank: int, world_size: int) -> PeerLost | None:
    """:class:`PeerLost` for a collective's error whose peer is gone (None: another error). The CLI asks it too, for
    a collective outside a stage's :func:`peer_errors` (agreeing on the options, the calibration set, statistics)."""
    if not _peer_gone(e):
        return None
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return PeerLost(f"distributed run (rank {rank} of {world_size}) stopped: {first[:300]} "
                    "(another rank exited or lost its connection)")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank's contiguous share of items: sizes differ by at most one, earlier ranks take the extra."""
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (1 if rank < extra else 0)])


def all_gather_shares(part: list[T], env: DistEnv) -> list[T]:
    """Every rank's ``part`` (picklable, CPU tensors), concatenated in rank order: with :func:`shard`'s
    contiguous shares of a list, the whole list back on every rank. Splitting per-item work (a
    layer's experts) across ranks and reassembling it this way gives each rank exactly the list one
    process computes, item by item."""
    if not env.enabled:
        return list(part)

    return [x for p in all_gather_saved(list(part), env, torch.device("cpu")) for x in p]


def all_gather_saved(obj, env: DistEnv, device: torch.device) -> list:
    """Every rank's ``obj`` (tensors in it on any device), in rank order, its tensors on ``device``.

    torch.save, not all_gather_object's plain pickle: pickle cannot rebuild float8 tensors (torch 2.13:
    "UntypedStorage has no attribute dtype"), which the FP8 and NVFP4 expert shares hold, and it rebuilds a
    CUDA tensor on the GPU it was pickled from (rank 1's sums arrived on cuda:1 in rank 0's process, and adding
    them to rank 0's failed); ``map_location`` puts every rank's tensors where this rank computes."""
    if not env.enabled:
        return [obj]
    import torch.distributed as dist

    buf = io.BytesIO()
    torch.save(obj, buf)
    everyone: list = [None] * env.world_size
    dist.all_gather_object(everyone, buf.getvalue())
    return [torch.load(io.BytesIO(b), map_location=device, weights_only=False) for b in everyone]


def _gather(env: DistEnv, value) -> list:
    """Every rank's ``value`` (picklable), in rank order; a lost peer said as :class:`PeerLost`."""
    import torch.distributed as dist

    everyone: list = [None] * env.world_size
    with peer_errors(env):
        dist.all_gather_object(everyone, value)
    return everyone


def agree(env: DistEnv, options: dict) -> None:
    """Every rank was started with the same ``options`` (a command's settings as plain data), else every
    rank refuses with the same line naming what differs. A rank started with another --seed or --group-size
    computed statistics the others reduced into rank 0's output without a word; another --kv-cache left the
    ranks waiting in a collective only some of them call."""
    if not env.enabled:
        return
    everyone = _gather(env, options)
    first = everyone[0]
    for r, theirs in enumerate(everyone[1:], 1):
        keys = [k for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k)]
        if keys:
            what = "; ".join(f"{k} {first.get(k)!r} on rank 0, {theirs.get(k)!r} on rank {r}" for k in keys[:3])
            raise MoepressError(f"torchrun ranks were started with different options ({what}); expected every "
                                "rank to run the same command")


def agree_on_input(env: DistEnv, path) -> None:
    """Every rank reads the same checkpoint under its MODEL (its fingerprint: config, index and shard headers,
    nothing of one machine's file system): a rank whose MODEL resolved to other weights (a relative path run from
    another directory, another node's copy) fed its statistics into rank 0's output."""
    if env.enabled:
        from moepress.compress.checkpoint.resume import input_fingerprint

        agree_on_read(env, "input checkpoints (config, index, shard headers)", input_fingerprint(path))


def agree_on_read(env: DistEnv, what: str, value) -> None:
    """Every rank read the same ``what`` (``value``: its digest) under the same names, else every rank refuses
    with one line."""
    if not env.enabled:
        return
    everyone = _gather(env, value)
    other = next((r for r, v in enumerate(everyone) if v != everyone[0]), None)
    if other is not None:
        raise MoepressError(f"torchrun ranks read different {what} under the same names ({everyone[0]} on rank "
                            f"0, {everyone[other]} on rank {other}); expected every rank to see the same files (a "
                            "relative path run from another directory, another node's copy)")


def _check_same(env: DistEnv, what: str, value) -> None:
    import torch.distributed as dist

    got: list = [None] * env.world_size
    dist.all_gather_object(got, value)
    if any(g != got[0] for g in got):
        raise MoepressError(f"distributed run: ranks disagree on {what} ({got[0]!r} vs {got[1:]!r})")


def all_reduce_routing(stats, env: DistEnv):
    """Sum every rank's RoutingStats into every rank's (in place; counts stay int64, sums float64)."""
    if not env.enabled:
        return stats
    import torch.distributed as dist

    layers = sorted(stats.layers)
    _check_same(env, "MoE layers and expert counts",
                [(i, stats.layers[i].num_experts, stats.layers[i].top_k) for i in layers])
    ints = torch.cat([torch.cat([torch.tensor([stats.layers[i].tokens], dtype=torch.int64),
                                 stats.layers[i].counts.cpu().reshape(-1),
                                 stats.layers[i].reap_count.cpu().reshape(-1),
                                 stats.layers[i].coselect.cpu().reshape(-1)]) for i in layers])
    floats = torch.cat([torch.cat([getattr(stats.layers[i], k).cpu().reshape(-1)
                                   for k in ("gate_sum", "norm_sum", "reap_sum")]) for i in layers])
    ints, floats = ints.to(env.device), floats.to(env.device)
    dist.all_reduce(ints, op=dist.ReduceOp.SUM)
    dist.all_reduce(floats, op=dist.ReduceOp.SUM)
    ints, floats = ints.cpu(), floats.cpu()
    a = b = 0
    for i in layers:
        lr: LayerRouting = stats.layers[i]
        e = lr.num_experts
        lr.tokens = int(ints[a])
        lr.counts = ints[a + 1:a + 1 + e].clone()
        lr.reap_count = ints[a + 1 + e:a + 1 + 2 * e].clone()
        lr.coselect = ints[a + 1 + 2 * e:a + 1 + 2 * e + e * e].view(e, e).clone()
        a += 1 + 2 * e + e * e
        for k in ("gate_sum", "norm_sum", "reap_sum"):
            setattr(lr, k, floats[b:b + e].clone())
            b += e
    return stats


def all_reduce_absmax(amax, env: DistEnv):
    """Elementwise max of every rank's ``{name: amax}`` (a dict, or an InputAbsMax whose ``amax``
    is replaced in place); a name seen by any rank is kept.

    An expert that got no tokens on one rank has no entry there: that rank contributes
    zeros, which a max of absolute values ignores.
    """
    if not env.enabled:
        return amax
    if hasattr(amax, "amax"):
        amax.amax = all_reduce_absmax(amax.amax, env)
        return amax
    import torch.distributed as dist

    shapes: list = [None] * env.world_size
    dist.all_gather_object(shapes, {k: tuple(v.shape) for k, v in amax.items()})
    union: dict[str, tuple] = {}
    for s in shapes:
        for k, shp in s.items():
            if union.setdefault(k, shp) != shp:
                raise MoepressError(f"distributed run: ranks disagree on the shape of {k} ({union[k]} vs {shp})")
    names = sorted(union)
    if not names:
        return {}
    sizes = [int(torch.Size(union[k]).numel()) for k in names]
    flat = torch.cat([amax[k].float().cpu().reshape(-1) if k in amax else torch.zeros(n)
                      for k, n in zip(names, sizes, strict=True)]).to(env.device)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    flat = flat.cpu()
    out, a = {}, 0
    for k, n in zip(names, sizes, strict=True):
        out[k] = flat[a:a + n].view(union[k]).clone()
        a += n
    return out
