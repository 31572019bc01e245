"""Crash-safe checkpoint files: atomic writes and a content hash checked on every load.

A checkpoint is the ordinary ``torch.save`` zip archive plus one extra member, ``<archive>/fewstep-sha256``: the
SHA-256 over every other member (name and bytes, in archive order). ``torch.load`` ignores the extra member, so a
checkpoint stays a plain PyTorch file; :func:`verify` recomputes the digest (and ``zipfile`` checks each member's
CRC-32 on the way), so a flipped bit, a truncated file or a file that is not a checkpoint is a one-line
:class:`CheckpointError` instead of a NaN run.

Writes go to a temporary file *in the target directory* (never ``$TMPDIR``), are flushed and ``fsync``-ed, then
``os.replace``-d over the target and the directory is ``fsync``-ed: a kill at any moment leaves either the previous
good file or the new one, never a 0-byte or half file (a stale ``.<name>.tmp-<pid>`` may remain; run directories
remove those when a run starts, :func:`remove_stale_temporaries`).

Departure from Lightning: :class:`SafeCheckpointIO` replaces ``TorchCheckpointIO`` (whose ``_atomic_save`` writes
through an fsspec transaction that stages in ``$TMPDIR`` and truncates the target first). FSDP2 runs
(``ModelParallelStrategy``) write sharded ``torch.distributed.checkpoint`` directories and keep Lightning's writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Any

from fewstep_rl.config import ConfigError

HASH_MEMBER = "fewstep-sha256"
TMP_MARK = ".tmp-"


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be trusted: truncated, corrupted, or not a checkpoint."""


def _digest(zf: zipfile.ZipFile, skip: str | None = None) -> str:
    h = hashlib.sha256()
    for info in zf.infolist():
        if info.filename == skip:
            continue
        h.update(info.filename.encode())
        h.update(b"\0")
        with zf.open(info) as f:  # zipfile checks the member's CRC-32 as it reads
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hash_member_name(zf: zipfile.ZipFile) -> str:
    first = zf.infolist()[0].filename
    return f"{first.split('/', 1)[0]}/{HASH_MEMBER}" if "/" in first else HASH_MEMBER


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``, fsync dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checkpoint_bytes(checkpoint: Any) -> bytes:
    """``torch.save`` bytes of ``checkpoint`` with the content-hash member appended."""
    import torch

    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    with zipfile.ZipFile(buf, "a") as zf:
        name = _hash_member_name(zf)
        digest = _digest(zf)
        zf.writestr(name, digest)
    return buf.getvalue()


def save_checkpoint(checkpoint: Any, path: str | Path) -> None:
    """Atomically write a hashed checkpoint."""
    atomic_write_bytes(path, checkpoint_bytes(checkpoint))


def verify(path: str | Path) -> bool:
    """Check a checkpoint file; True when it carries a content hash (older files without one pass on their CRCs).

    Raises :class:`CheckpointError` naming the file and what is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    size = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as zf:
            if not zf.infolist():
                raise zipfile.BadZipFile("empty archive")
            name = _hash_member_name(zf)
            stored = zf.read(name).decode() if name in zf.namelist() else None
            actual = _digest(zf, skip=name)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, UnicodeDecodeError, NotImplementedError) as e:
        what = "corrupted (a checksum does not match)" if "CRC" in str(e) else "truncated or not a checkpoint file"
        raise CheckpointError(f"checkpoint {p} is {what} ({size} bytes; {e}); use an intact checkpoint, e.g. "
                              f"an earlier iter=*.ckpt") from None
    if stored is not None and stored != actual:
        raise CheckpointError(f"checkpoint {p} is corrupted: its content hash does not match ({actual[:12]} != "
                              f"stored {stored[:12]}); use an intact checkpoint, e.g. an earlier iter=*.ckpt")
    return stored is not None


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify then load a checkpoint (a :class:`CheckpointError` for anything unreadable)."""
    import torch

    verify(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a fewstep-rl checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def remove_stale_temporaries(d: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` files left by a writer that was killed mid-write (call under the run lock)."""
    removed = []
    if d.is_dir():
        for p in d.rglob(f".*{TMP_MARK}*"):
            if p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def _safe_io_cls() -> type:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class SafeCheckpointIO(TorchCheckpointIO):
        """Lightning checkpoint IO: atomic write in the target directory + content hash, verified on load."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if storage_options is not None:
                raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
            save_checkpoint(checkpoint, path)

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
            return load_checkpoint(path, map_location=map_location)

    return SafeCheckpointIO


def SafeCheckpointIO() -> Any:  # noqa: N802 - a factory that keeps lightning out of import time
    return _safe_io_cls()()
