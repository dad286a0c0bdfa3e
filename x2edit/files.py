"""Files: atomic writes (a reader, or a crash, never sees a half-written output) and safe state loading."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block succeeds.

    The temporary name keeps the suffix (``.out.png.tmp.png``), so writers that pick a format from
    the extension (PIL, safetensors) still do.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: Path, error: type[Exception] = ValueError) -> dict:
    """A ``torch.save``d training state (optimizer, scheduler, EMA: tensors in plain containers), loaded
    with ``weights_only=True``: a checkpoint from elsewhere that holds any other pickled object is refused
    with ``error`` instead of being unpickled, which could run its code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise error(f"{path} holds pickled objects other than tensors and plain containers, so it was not "
                    f"written by x2edit; it is not loaded, as unpickling it could run code "
                    f"({str(e).splitlines()[0]})") from None
