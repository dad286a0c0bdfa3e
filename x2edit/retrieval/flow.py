"""How community LoRAs edit on a one-step editor, in one step or several: the LoRA flow.

x2edit-tiny edits in one step from the source (``AdapterConfig.source_start`` = s, 0.5): the source
tokens are the transformer's sample at noise level s, and the pipeline reads a direct-reading LoRA
beside the residual editing adapter as (``x2edit.adapters.residual``)

    x0 = source + R_edit - s * dF(source, s),      dF = F_loras - F_base        all (B, T, C)

With the editing adapter at weight 0 (R_edit = 0) that is one Euler step, from sigma = s to 0, of

    dx / dsigma = dF(x, sigma),        x(s) = source,    edited image = x(0)

so the LoRAs' change of the base's velocity *is* the velocity of a flow from the source to the edit.
A concept LoRA is trained as that flow's velocity along the straight path from the source to its
exact target (``x2edit.retrieval.pool``): dF(x_sigma, sigma) = (source - target) / s at
x_sigma = (sigma / s) source + (1 - sigma / s) target, the same target at every sigma. One step
gives the pipeline's edit exactly (``tests/retrieval`` checks it against ``X2EditPipeline``); n
steps integrate the same flow with the LoRAs seen at n noise levels, which is where a fusion's
gates may vary with the timestep (``x2edit.retrieval.fusion``).

The source also enters as Kontext reference tokens (position-id coordinate 1), as in the pipeline.
Adapters other than the LoRAs named in a call (x2edit-tiny's editing adapter) are off in both terms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from x2edit.adapters import adapter_layers, adapter_names, routing_context
from x2edit.adapters.residual import adapters_disabled

SIGMA_START = 0.5  # x2edit-tiny's AdapterConfig.source_start

# (gate_fn for RoutingState.adapter_gates, weight) of one transformer pass; a step's dF is the
# weighted sum of its passes' changes (one pass, except for fusions that average predictions).
Pass = tuple[Callable | None, float]


def straight_path(source: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, s: float) -> torch.Tensor:
    """x_sigma = (sigma / s) source + (1 - sigma / s) target, for (B,) sigmas in (0, s]."""
    t = (sigma / s).to(source.dtype).view(-1, *([1] * (source.dim() - 1)))
    return t * source + (1 - t) * target


def flow_loss(delta: torch.Tensor, source: torch.Tensor, target: torch.Tensor, s: float,
              floor: float = 1e-3) -> torch.Tensor:
    """Per-sample (B,) error of a velocity change against the flow to ``target``, relative to the edit.

    mean((dF - v)^2) / mean(v^2) with v = (source - target) / s: at sigma = s it equals
    MSE(one-step output, target) / MSE(source, target) = 10^(-edit gain / 10), 1 for a no-op, as the
    trainer's ``x0_edit`` weighting (``floor`` keeps near-unchanged pairs from dominating).
    """
    v = (source.float() - target.float()) / s
    err = ((delta.float() - v) ** 2).flatten(1).mean(1)
    return err / (v ** 2).flatten(1).mean(1).clamp(min=floor / s**2)


class LoraFlow:
    """Edit with LoRAs on a pipeline's transformer by the LoRA flow (see the module docstring).

    Args:
        pipe: an ``X2EditPipeline`` (x2edit-tiny's layout: pixel VAE, one sentence encoder).
        sigma_start: s, the noise level the one-step edit starts from.
    """

    def __init__(self, pipe, sigma_start: float = SIGMA_START):
        self.pipe, self.transformer, self.s = pipe, pipe.transformer, float(sigma_start)
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ids: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # -- images and text ---------------------------------------------------------------------
    @torch.no_grad()
    def tokens(self, images: list[np.ndarray]) -> torch.Tensor:
        """(B, T, C) packed latents of uint8 (H, W, 3) images, as the pipeline makes them."""
        pipe = self.pipe
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        z = pipe._encode_vae_image(x.to(self.device, pipe.vae.dtype), generator=None).to(self.transformer.dtype)
        b, c, h, w = z.shape
        return pipe._pack_latents(z, b, c, h, w)

    @torch.no_grad()
    def images(self, tokens: torch.Tensor, height: int, width: int) -> list[np.ndarray]:
        """uint8 images of (B, T, C) packed latents, as the pipeline decodes them."""
        pipe = self.pipe
        z = pipe._unpack_latents(tokens.to(pipe.vae.dtype), height, width, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        x = pipe.vae.decode(z, return_dict=False)[0]
        x = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return list((x * 255).round().astype(np.uint8))

    def _position_ids(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        key = (height, width)
        if key not in self._ids:
            h = 2 * (height // (self.pipe.vae_scale_factor * 2))
            w = 2 * (width // (self.pipe.vae_scale_factor * 2))
            ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, tokens.dtype)
            ref = ids.clone()
            ref[..., 0] = 1  # Kontext: reference tokens are marked by position-id coordinate 1
            self._ids[key] = torch.cat([ids, ref])
        return self._ids[key]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeddings (B, L, D), pooled (B, D)), cached per prompt."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            embeds, pooled, _ = self.pipe.encode_prompt(new, device=self.device)
            for p, e, q in zip(new, embeds, pooled):
                self._text[p] = (e, q)
        return (torch.stack([self._text[p][0] for p in prompts]), torch.stack([self._text[p][1] for p in prompts]))

    # -- the flow ----------------------------------------------------------------------------
    def _forward(self, x, source, sigma, text, size) -> torch.Tensor:
        embeds, pooled = text
        t = x.shape[1]
        guidance = torch.ones(len(x), device=self.device) if self.transformer.config.guidance_embeds else None
        out = self.transformer(hidden_states=torch.cat([x, source], 1), timestep=sigma.to(x.dtype), guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=embeds,
                               txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=x.dtype),
                               img_ids=self._position_ids(x, *size), return_dict=False)[0]
        return out[:, :t]  # (B, T, C) the target tokens

    @contextlib.contextmanager
    def only(self, names: list[str]) -> Iterator[None]:
        """Run the block with every adapter but ``names`` off."""
        with adapters_disabled(self.transformer, [n for n in adapter_names(self.transformer) if n not in names]):
            yield

    def velocity_change(self, x: torch.Tensor, source: torch.Tensor, sigma: torch.Tensor,
                        text: tuple[torch.Tensor, torch.Tensor], names: list[str], passes: list[Pass],
                        size: tuple[int, int], base: torch.Tensor | None = None) -> torch.Tensor:
        """dF(x, sigma) (B, T, C) of LoRAs ``names``: sum over ``passes`` of weight * (F_pass - F_base).

        Args:
            x, source: (B, T, C) current sample and source tokens.
            sigma: (B,) noise levels.
            text: ``encode`` of the prompts.
            names: the LoRAs; every other adapter is off in both terms.
            passes: (gate_fn, weight) per pass; gate_fn feeds ``RoutingState.adapter_gates`` (None: none).
            size: (height, width) of the images.
            base: F_base if already known (it does not depend on the LoRAs).
        Differentiable w.r.t. the LoRAs and any gate tensors the gate functions return.
        """
        with self.only(names):
            total = 0.0
            for gate_fn, weight in passes:
                with routing_context(self.transformer, timestep=sigma) as state:
                    state.adapter_gates = gate_fn
                    total = total + weight * self._forward(x, source, sigma, text, size)
            if base is None:
                with torch.no_grad(), adapters_disabled(self.transformer, names):
                    base = self._forward(x, source, sigma, text, size)
        return total - sum(w for _, w in passes) * base

    @torch.no_grad()
    def edit(self, sources: list[np.ndarray], prompts: list[str], names: list[str],
             plan: Callable[[torch.Tensor, int], list[Pass]], steps: int = 1) -> list[np.ndarray]:
        """Edit uint8 ``sources`` with LoRAs ``names`` by ``steps`` Euler steps of the flow, sigma = s -> 0.

        Args:
            plan: (sigma (B,), step index) -> the passes of that step (a fusion's ``plan``).
        """
        h, w = sources[0].shape[:2]
        src = self.tokens(sources)
        text = self.encode(prompts)
        x = src
        sigmas = torch.linspace(self.s, 0.0, steps + 1)
        for i in range(steps):
            sigma = torch.full((len(x),), float(sigmas[i]), device=self.device)
            delta = self.velocity_change(x, src, sigma, text, names, plan(sigma, i), (h, w))
            x = x + float(sigmas[i + 1] - sigmas[i]) * delta  # Euler: dx = dF dsigma
        return self.images(x, h, w)


def layer_slots(model: torch.nn.Module) -> dict[int, str]:
    """{id(AdapterLinear): its module name} for the adapter layers of ``model``."""
    return {id(layer): name for name, layer in adapter_layers(model)}
