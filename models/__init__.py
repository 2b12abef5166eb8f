"""The tiny MoE models bundled for tests and the default `moepress run` (trained offline by tools/train_tiny.py),
and test fixtures derived from them (``FIXTURES``: not in ``BUNDLED``, which the README and the default
run iterate; written by tools/make_odd_width.py, make_kimi_int4.py, make_mxfp4.py)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLED = ("tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3")
DEFAULT = "tiny-qwen3-moe"
# tiny-mixtral with expert width 192: not a multiple of the INT4 group / FP8 block size (128);
# tiny-deepseek-v3 stored as Kimi K2 Thinking ships (model_type kimi_k2, routed experts compressed-tensors
# pack-quantized INT4 group 32: tools/make_kimi_int4.py); tiny-qwen3-moe with compressed-tensors MXFP4
# experts (tools/make_mxfp4.py)
FIXTURES = ("tiny-mixtral-w192", "tiny-kimi-k2-int4", "tiny-qwen3-moe-mxfp4")


def path(name: str = DEFAULT) -> Path:
    """Directory of a bundled model or test fixture."""
    return HERE / name


def all_paths() -> list[Path]:
    return [path(n) for n in BUNDLED]


def resolve(arg: str) -> Path:
    """A checkpoint directory; the name of a bundled model (e.g. ``tiny-qwen3-moe``); or a Hugging Face Hub
    id (``org/name``, ``org/name@revision``) already in the local Hub cache, as ``hf download`` leaves it:
    its snapshot folder. moepress never downloads: a checkpoint is hundreds of GB, fetched once, on purpose."""
    from moepress.errors import MoepressError

    p = Path(arg)
    if p.exists():
        return p
    if arg in BUNDLED or arg in FIXTURES:
        return path(arg)
    hub = _hub_snapshot(arg)
    if hub is not None:
        return hub
    repo, _, rev = arg.partition("@")
    # org/name whose org is a local folder reads as a mistyped path: no download hint for it
    hub = _hub_id(arg) and not Path(repo).parent.exists()
    cached = (f", nor a Hugging Face Hub id in the local cache ({_hub_cache()}; fetch it first: "
              f"hf download {repo}{f' --revision {rev}' if rev else ''})" if hub else "")
    raise MoepressError(f"{arg}: no such checkpoint directory{cached} (bundled models: {', '.join(BUNDLED)}; "
                        f"test fixtures: {', '.join(FIXTURES)})")


def _hub_id(arg: str) -> bool:
    """``org/name`` or ``org/name@revision``, as the Hub spells a model id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo = arg.partition("@")[0]
    if repo.count("/") != 1:
        return False
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_snapshot(arg: str) -> Path | None:
    """The snapshot folder of Hub id ``arg`` in the local Hub cache (HF_HUB_CACHE / HF_HOME), without network
    access (``local_files_only``); None where it is not a Hub id or not cached."""
    if not _hub_id(arg):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, rev = arg.partition("@")
    try:
        return Path(snapshot_download(repo, revision=rev or None, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
