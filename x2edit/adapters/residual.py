"""The residual reading of an editing adapter: what the adapter changes is the change to the source.

An adapter with ``AdapterConfig.reading = "residual"`` is read, at the target tokens, as

    x0_hat = source + (F_adapted - F_base)                      all (B, T, C)

where F is the transformer's output with the adapter on / off for the same call and ``source`` the
Kontext reference tokens of that call (same grid as the target). A fresh adapter (LoRA B = 0) makes
F_adapted == F_base, so it returns the source unchanged, and training only has to learn what to
change. That is the point: under the direct reading x2edit-tiny's adapter never learned to copy
the reference tokens, and its edits lost the unchanged background (measured in the README; our
explanation, not proven: q/k RMS norms with gains near 1 keep the attention over 64 reference tokens
soft).

The stock Euler scheduler then integrates the velocity this implies, (x_t - x0_hat) / sigma, so the
pipeline loop is that of any flow model and its last step lands on x0_hat (training floors sigma at
SIGMA_FLOOR in the loss weight, sampling does not). An edit from the source at noise level s (one-step
adapters, ``AdapterConfig.source_start``) is read instead as the straight path from the source to x0_hat
plus the direct adapters' velocity (``residual_reading(start=s)``): the same edit in one step, and n steps
that keep what direct adapters add. Cost: one more transformer call, without gradients, per step. A residual
adapter cannot be merged into the base or exported as a plain diffusers LoRA: without the base's own output
beside it, a stock pipeline would read it directly.

Adapters with the direct reading active beside it (community LoRAs loaded with
``load_lora_weights``) keep their own reading: each changes the base's velocity, i.e. its x0 by
-sigma times that change. With F_all (every adapter on), F_direct (the residual ones off) and F_none
(all off):

    x0_hat = source + (F_all - F_direct) - sigma * (F_direct - F_none)

Reading both terms as one residual (F_all - F_none) would add a LoRA's velocity change to the image
with the wrong sign and scale, and leaving the LoRA in both terms of the plain formula cancels it
(the first version did that). A third transformer call per step is made only while direct adapters
are active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from x2edit.adapters.inject import adapter_layers
from x2edit.schedulers import velocity_from_sample


def residual_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters of ``model`` that use the residual reading."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        for n in layer.active_adapters:
            if layer.adapters[n].config.reading == "residual":
                names[n] = None
    return list(names)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Run the block with adapters ``names`` switched off (the others stay as they are)."""
    saved = [(layer, list(layer.active_adapters)) for _, layer in adapter_layers(model)]
    for layer, active in saved:
        layer.active_adapters = [n for n in active if n not in names]
    try:
        yield
    finally:
        for layer, active in saved:
            layer.active_adapters = active


def split_reference(hidden_states: torch.Tensor, img_ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(number of target tokens T, reference tokens (B, T, C)) of a Kontext-layout transformer input.

    The target tokens come first (position-id coordinate 0), then the reference tokens (coordinate
    1); the residual reading needs exactly one reference image on the target's grid.
    """
    if img_ids.dim() == 3:  # diffusers still accepts a batch dimension here
        img_ids = img_ids[0]
    n = int((img_ids[:, 0] == 0).sum())
    if n == hidden_states.shape[1]:
        raise ValueError("a residual-reading adapter edits a source image: pass image= (there are no reference "
                         "tokens in this call)")
    if hidden_states.shape[1] != 2 * n:
        raise ValueError(f"a residual-reading adapter needs the source on the output's grid: {n} target tokens "
                         f"but {hidden_states.shape[1] - n} reference tokens")
    return n, hidden_states[:, n:]


def residual_sample(adapted: torch.Tensor, base: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """x0_hat = reference + (adapted - base), all (B, T, C) at the target tokens."""
    return reference + (adapted - base)


def _active(model: nn.Module) -> list[str]:
    """Names of the adapters active (with a non-zero weight) in any layer of ``model``, in order."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update((n, None) for n in layer.active_adapters if layer.adapter_weights[n] != 0 and n not in layer.merged)
    return list(names)


@contextlib.contextmanager
def residual_reading(model: nn.Module, names: list[str] | None = None, start: float | None = None) -> Iterator[None]:
    """Make ``model``'s forward return the velocity implied by the residual reading of ``names``.

    For sampling with a stock flow-matching pipeline: inside the block each call of the transformer
    runs twice (adapters ``names`` on, then off; three times while direct-reading adapters are active
    too, see the module docstring) and returns ``(v,)`` / ``.sample = v`` at the target tokens,
    v = (x_t - x0_hat) / sigma; the pipeline crops and steps it as usual.
    names: default: every active residual adapter.
    start: for an edit from the source at noise level s (``AdapterConfig.source_start``): the velocity of
        the straight path from the source to the residual estimate plus the direct adapters' change,
        v = (source - (source + R)) / s + (F_direct - F_none). One step from s is the same edit as above;
        n steps integrate the direct adapters' change as the LoRA flow does (``x2edit.retrieval.flow``),
        where v = (x_t - x0_hat) / sigma would re-anchor each step at the source and keep about 1/n of it.
    """
    names = residual_adapters(model) if names is None else names
    if not names:
        yield
        return
    forward = model.forward
    own = model.__dict__.get("forward")  # accelerate may have set one already: put that back after

    def read(*args, **kwargs):
        hidden, img_ids, sigma = kwargs["hidden_states"], kwargs["img_ids"], kwargs["timestep"]
        n, reference = split_reference(hidden, img_ids)
        first = lambda o: (o[0] if isinstance(o, tuple) else o.sample)[:, :n]  # noqa: E731 (B, T, C) target tokens
        out = forward(*args, **kwargs)
        direct = [a for a in _active(model) if a not in names]
        with adapters_disabled(model, names):
            base = first(forward(*args, **kwargs))  # F_direct: the base with the direct adapters
            if direct:
                with adapters_disabled(model, direct):
                    bare = first(forward(*args, **kwargs))  # F_none
        x0 = residual_sample(first(out), base, reference)
        if start is not None:  # from the source: the straight path to x0, plus the direct adapters' velocity
            v = (reference - x0) / start + ((base - bare) if direct else 0)
        else:
            s = sigma.to(base.dtype).view(-1, 1, 1)
            if direct:
                x0 = x0 - s * (base - bare)  # the direct adapters' change of the base's x0 estimate
            v = velocity_from_sample(hidden[:, :n], x0, s)
        if isinstance(out, tuple):
            return (v,)
        out.sample = v
        return out

    model.forward = read
    try:
        yield
    finally:
        if own is None:
            del model.forward  # back to the class's forward
        else:
            model.forward = own
