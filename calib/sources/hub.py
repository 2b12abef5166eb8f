"""Hugging Face Hub datasets as calibration sources, streamed (nothing is downloaded whole)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from moepress.calib.sources.documents import _check_value, _pick_field
from moepress.calib.sources.spec import SourceSpec
from moepress.errors import MoepressError


def _hub_reachable() -> str | None:
    """None when the Hub looks reachable, else why not (checked fast: no retries, 5 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # reachability is the proxy's business
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        return f"cannot reach {host} ({e.strerror or e})"
    return None


def hub_documents(src: SourceSpec, seed: int):
    """A Hub dataset, streamed (nothing is downloaded whole); yields documents in a seeded shuffled order."""
    why = _hub_reachable()
    if why is not None:
        what = "a Hugging Face Hub dataset" if src.spec.startswith("hf:") or ",type=hub" in src.spec else \
            "no such local path, so read as a Hugging Face Hub dataset"
        raise MoepressError(f"--calib {src.spec}: {what}, but {why}; save it where the network allows "
                            f"(datasets save_to_disk, JSONL or Parquet) and pass that path")
    try:
        import datasets
    except ImportError:
        raise MoepressError(f"--calib {src.spec}: reading a Hub dataset needs the 'datasets' package "
                            f"(pip install 'moepress[data]')") from None
    try:
        ds = datasets.load_dataset(src.location, src.config, split=src.split or "train", streaming=True,
                                   revision=src.revision)
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
        it = iter(ds)
        first = next(it)
    except StopIteration:
        raise MoepressError(f"--calib {src.spec}: the dataset is empty") from None
    except Exception as e:
        raise MoepressError(f"--calib {src.spec}: cannot load the Hub dataset "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    field = _pick_field(src, list(first), src.location)

    def gen():
        yield _check_value(first[field], src.location, field)
        for rec in it:
            yield _check_value(rec[field], src.location, field)
    return gen()
