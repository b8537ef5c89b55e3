"""Where probe results live and what they depend on (memfit.cost_models.probes).

Results are kept in this process's memory and in `cache_path()`: `$MEMFIT_CACHE_DIR`, else
`$XDG_CACHE_HOME/memfit`, else `~/.cache/memfit`, file `probes-v1.json`, written atomically
and merged with what another process wrote meanwhile; delete the file to clear the cache. A
corrupt or unwritable file is logged at info and ignored. `device_signature` names the device
and kernel library a result was measured on, part of every probe's key.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import re
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("memfit.cost_models.probes")   # one logger for probing and its cache

CACHE_FORMAT = 1
CACHE_FILE = f"probes-v{CACHE_FORMAT}.json"


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; platform's answer elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


@functools.lru_cache(maxsize=None)
def _onednn_version() -> str:
    # torch exposes no oneDNN version call; its build configuration names it.
    m = re.search(r"MKL-DNN v([0-9][0-9.]*)", torch.__config__.show())
    return m.group(1) if m else "unknown"


@functools.lru_cache(maxsize=None)
def _cuda_name(idx: int) -> str:
    cap = ".".join(map(str, torch.cuda.get_device_capability(idx)))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return f"cuda/{torch.cuda.get_device_name(idx)}/sm{cap}/cuda-{torch.version.cuda}/cudnn-{cudnn}"


def device_signature(device: torch.device) -> str:
    """The device and kernel library a probe ran on, e.g. "cpu/<model>/AVX512/onednn-3.12.0"."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        # cudnn.benchmark picks algorithms (and so workspaces) by timing.
        return f"{_cuda_name(idx)}/benchmark={int(torch.backends.cudnn.benchmark)}"
    if device.type == "cpu":
        onednn = f"onednn-{_onednn_version()}" if torch.backends.mkldnn.is_available() else "onednn-none"
        if not torch.backends.mkldnn.enabled:
            onednn += "-disabled"
        return f"cpu/{cpu_name()}/{torch.backends.cpu.get_cpu_capability()}/{onednn}"
    return device.type


def cache_dir() -> Path:
    """Where probe results are kept: $MEMFIT_CACHE_DIR, else $XDG_CACHE_HOME/memfit, else ~/.cache/memfit."""
    env = os.environ.get("MEMFIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "memfit"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


_memo: dict[str, dict] = {}
_disk: dict[Path, dict[str, dict]] = {}   # path -> entries read from it (or written to it)


def clear_memo() -> None:
    """Forget probe results held in this process (the file on disk stays)."""
    _memo.clear()
    _disk.clear()


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.info("memfit: ignoring unreadable probe cache %s (%s)", path, e)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("probes"), dict):
        log.info("memfit: ignoring probe cache %s: not a format-%d probe file", path, CACHE_FORMAT)
        return {}
    # kernel scratch entries carry scratch_bytes; other measurements (host transfers, forward
    # profiles) name their kind
    return {k: v for k, v in data["probes"].items()
            if isinstance(v, dict) and (isinstance(v.get("scratch_bytes"), int) or isinstance(v.get("kind"), str))}


def _disk_entries(path: Path) -> dict[str, dict]:
    if path not in _disk:
        _disk[path] = _read_cache(path)
    return _disk[path]


def write_cache(path: Path, new: dict[str, dict]) -> None:
    """Add `new` entries to the cache file at `path` (atomic; merged with what is there)."""
    # Merge with what another process may have written since we read the file.
    entries = {**_read_cache(path), **_disk_entries(path), **new}
    _disk[path] = entries
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probes-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": CACHE_FORMAT, "probes": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        log.info("memfit: cannot write probe cache %s (%s); keeping probes in memory", path, e)


def lookup(key: str) -> dict | None:
    """A probe result by key: from memory, else from the cache file (then memoized)."""
    if key in _memo:
        return _memo[key]
    hit = _disk_entries(cache_path()).get(key)
    if hit is not None:
        _memo[key] = hit
    return hit




def memoize(key: str, entry: dict) -> None:
    """Hold a new probe result in memory (written to disk by write_cache)."""
    _memo[key] = entry
