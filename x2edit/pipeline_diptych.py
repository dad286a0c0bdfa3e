"""X2EditDiptychPipeline: in-context editing on a FLUX Fill model (ICEdit's diptych), beside the Kontext path.

It is diffusers' ``FluxFillPipeline``: called with stock's arguments (``image`` + ``mask_image``) it inpaints
as stock does, with x2edit's hooks on top (task routing of an MoE-LoRA, community LoRAs and their fusion,
the sentence-encoder text layout; ``X2EditPipelineMixin``). The edit itself is ``edit(image, prompt)``:

    canvas (H, 2W):  [ source | source ]     the right half is the start of a one-step or strength < 1 edit
    mask   (H, 2W):  [   0    |   1    ]     Fill zeroes the masked half of its condition and repaints it
    prompt:          the diptych template around the instruction (ICEdit's, identical in training)
    result:          the right half of the output, at the source's size

Unlike ICEdit, any size and aspect ratio is edited (each half is the source capped at ``max_area`` pixels and
rounded to the model's grid), and the canvas costs twice the tokens of the edited image: attention over the
joint sequence grows about 4x.

``fill_transformer_from`` turns a text-to-image or Kontext transformer into a Fill one (zero-initialised
condition channels), the way FLUX.1 Fill extends FLUX.1's input layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import FluxFillPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from PIL import Image

from x2edit.adapters import residual_adapters, static_merge
from x2edit.pipeline_common import (
    X2EditPipelineMixin,
    _check_instructions,
    _check_positive,
    _check_sources,
    _fit,
    _pixels,
    _resize_sources,
)
from x2edit.pipeline_lora import X2EditLoraMixin
from x2edit.pixel_vae import PixelShuffleVAE  # noqa: F401 (diffusers loads saved components only from imported modules)

# ICEdit's prompt, the same in training and inference (their results degrade without the prefix).
DIPTYCH_TEMPLATE = ("A diptych with two side-by-side images of the same scene. On the right, the scene is exactly "
                    "the same as on the left but {instruction}")


def fill_channels(latent_channels: int, vae_scale_factor: int) -> int:
    """Input channels of a Fill transformer: packed noisy latents (4C) + packed masked-image latents (4C) + the
    packed mask (each latent pixel carries its vae_scale_factor^2 mask pixels, 2x2 packed: 4 f^2).
    FLUX.1 Fill: 64 + 64 + 256 = 384; x2edit-tiny (C = 48, f = 4): 192 + 192 + 64 = 448."""
    return 8 * latent_channels + 4 * vae_scale_factor**2


def fill_transformer_from(transformer: FluxTransformer2DModel, latent_channels: int,
                          vae_scale_factor: int) -> FluxTransformer2DModel:
    """A Fill-layout copy of a text-to-image / Kontext transformer: the same weights, ``x_embedder`` widened to
    the condition channels with zeros, so the copy starts as the original on the noisy latents alone."""
    cfg = dict(transformer.config)
    c_in = cfg["in_channels"]
    if c_in != 4 * latent_channels:
        raise ValueError(f"the transformer takes {c_in} input channels, not the 4 x {latent_channels} packed latent "
                         "channels of a text-to-image or Kontext model; is it a Fill model already?")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["in_channels"], cfg["out_channels"] = fill_channels(latent_channels, vae_scale_factor), cfg.get("out_channels") or c_in
    fill = FluxTransformer2DModel(**cfg).to(dtype=transformer.dtype)
    state = {k: v for k, v in transformer.state_dict().items() if "x_embedder" not in k}
    missing, unexpected = fill.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"x_embedder.weight", "x_embedder.bias"}:
        raise ValueError(f"cannot copy the transformer into a Fill layout: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        fill.x_embedder.weight.zero_()
        fill.x_embedder.weight[:, :c_in] = transformer.x_embedder.weight  # (inner, C_in) of (inner, C_fill)
        fill.x_embedder.bias.copy_(transformer.x_embedder.bias)
    return fill


class X2EditDiptychPipeline(X2EditPipelineMixin, X2EditLoraMixin, FluxFillPipeline):
    """Edit images from instructions as ICEdit does: a FLUX Fill model repaints the right half of a diptych.

    Components are ``FluxFillPipeline``'s; ``text_encoder_2``/``tokenizer_2`` may be None (the sentence-encoder
    layout of x2edit-tiny). x2edit adapters, community LoRAs (ICEdit's, with ``x_embedder``, included) and the
    LoRA / adapter methods behave as on ``X2EditPipeline``.
    """

    _optional_components = ["text_encoder_2", "tokenizer_2"]
    editing_mode = "diptych"
    # What ``edit`` uses when a call passes None: ICEdit's values on FLUX.1 Fill, or what a bundled model
    # records in its x2edit_embedded.json (the registry sets them; x2edit-tiny-fill: one step, 64x64 halves).
    default_num_inference_steps: int = 28
    default_guidance_scale: float = 50.0
    default_max_area: int = 512**2  # of the edited image; the canvas is twice that
    diptych_template: str = DIPTYCH_TEMPLATE

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, text_encoder_2=None, tokenizer_2=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
        self._init_x2edit_state()

    # -- the stock call, with x2edit's hooks ------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 30.0,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock's default; never mutated)
        max_sequence_length: int | None = None,
        *,
        task: str | int | list[str | int] | None = None,
        lora_index=None,
        auto_lora_top_k: int | None = None,
        auto_lora_fusion=None,
        auto_lora_min_score: float | None = None,
    ):
        """Inpaint ``mask_image``'s white area of ``image`` as stock ``FluxFillPipeline`` does.

        The parameters are stock's, in its order and with its defaults (``max_sequence_length`` None: the length
        the active adapters were trained with, else 512), plus x2edit's keyword-only ones as on
        ``X2EditPipeline.__call__``: ``task`` (routes the MoE-LoRA; None classifies ``prompt``) and the
        AutoLoRA ones. A mask of another size than the image is refused (stock stretches it silently).
        For an edit from an instruction, call ``edit``.
        """
        _check_mask(image, mask_image)
        if residual_adapters(self.transformer):
            raise ValueError(f"the residual adapters {residual_adapters(self.transformer)} read the source from "
                             "reference tokens, which a Fill pipeline has none of: load them on X2EditPipeline")
        prompts = _check_instructions(prompt)
        n_prompts = len(prompts) if prompts is not None else (prompt_embeds.shape[0] if prompt_embeds is not None else 1)
        if max_sequence_length is None:
            max_sequence_length = self.text_length()
        routing = self._task_routing(prompts, task, n_prompts, num_images_per_prompt or 1)
        with self._call_hooks(prompts, routing, static_merge(self.transformer, calls=num_inference_steps),
                              joint_attention_kwargs, lora_index=lora_index, auto_lora_top_k=auto_lora_top_k,
                              auto_lora_fusion=auto_lora_fusion, auto_lora_min_score=auto_lora_min_score):
            return super().__call__(
                prompt=prompt, prompt_2=prompt_2, image=image, mask_image=mask_image,
                masked_image_latents=masked_image_latents, height=height, width=width, strength=strength,
                num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, output_type=output_type,
                return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                max_sequence_length=max_sequence_length)

    # -- the diptych edit ------------------------------------------------------------------------
    def diptych_canvas(self, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvas (N, 3, H, 2W) in [0, 1], mask (N, 1, H, 2W)) for sources (N, 3, H, W) in [0, 1]: the source
        on both halves (the right one is masked out of Fill's condition), the right half masked."""
        canvas = torch.cat([sources, sources], dim=-1)
        mask = torch.zeros_like(canvas[:, :1])
        mask[..., sources.shape[-1]:] = 1
        return canvas, mask

    @torch.no_grad()
    def edit(
        self,
        image,
        prompt: str | list[str],
        *,
        task: str | int | list[str | int] | None = None,
        height: int | None = None,
        width: int | None = None,
        max_area: int | None = None,
        strength: float | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        template: str | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (never mutated)
        max_sequence_length: int | None = None,
        lora_index=None,
        auto_lora_top_k: int | None = None,
        auto_lora_fusion=None,
        auto_lora_min_score: float | None = None,
    ):
        """Edit ``image`` following the instruction ``prompt`` on a [source | edit] diptych; the right half is
        the result.

        Args:
            image: the source: a PIL image, a path, an HxWx3 uint8 array, a list of them (one per instruction, or
                one for all), or a float tensor (B, 3, H, W) or (3, H, W) in [0, 1].
            prompt: the instruction, or one per source (non-empty, at most 2000 characters); it is put into
                ``template`` for the model and classified for ``task`` as it is.
            task: task name or id, or one per instruction, routing the MoE-LoRA; None classifies each instruction.
            height, width: the edited image's size; default the source's (one side keeps its aspect ratio),
                capped at ``max_area`` and rounded down to the model's grid. The canvas is (height, 2 * width).
            max_area: cap on the edited image's pixel area (the canvas has twice as many); None:
                ``default_max_area`` (512^2; x2edit-tiny-fill: 64x64, its training size).
            strength: < 1 starts from the source noised to that level on the right half (img2img), 1 from pure
                noise (ICEdit); None: 1, or the one-step start of a base or adapter trained to edit from the source
                (``source_start``), which takes exactly one step and refuses a strength.
            num_inference_steps, guidance_scale: None: ``default_num_inference_steps`` (28) and
                ``default_guidance_scale`` (50, ICEdit's on FLUX.1 Fill; ignored by models without guidance
                embedding).
            num_images_per_prompt: outputs per instruction, side by side ([A, A, B, B]).
            generator: a torch generator, or one per output.
            output_type: "pil", "np", "pt", or "latent" (the whole canvas's packed tokens).
            template: the prompt around the instruction, with ``{instruction}``; None: ``diptych_template``.
            joint_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length,
                lora_index, auto_lora_top_k, auto_lora_fusion, auto_lora_min_score: as ``__call__``.

        Returns:
            ``FluxPipelineOutput`` with the edited images, or ``(images,)`` when ``return_dict`` is False.
        """
        prompts = _check_instructions(prompt)
        if prompts is None:
            raise ValueError("edit needs an instruction: prompt=")
        if image is None:
            raise ValueError("edit needs the source image: image=")
        template = self.diptych_template if template is None else template
        if not isinstance(template, str) or "{instruction}" not in template:
            raise ValueError(f"template must contain '{{instruction}}', got {template!r}")
        _check_positive({"num_images_per_prompt": num_images_per_prompt},
                        {"height": height, "width": width, "max_area": max_area})
        sources, count, size = _check_sources(image)
        if count not in (1, len(prompts)):
            raise ValueError(f"got {count} source images for {len(prompts)} instructions: pass one image, or one per "
                             "instruction")
        cap = self.default_max_area if max_area is None else max_area
        wanted = self._requested_size(size, height, width)
        h, w = _fit(*wanted, cap, self.vae_scale_factor * 2, "the edited image")
        if max_area is None:
            self._warn_capped("the source image", wanted, (h, w), cap)
        start = self.source_start()
        sigmas = latents = None
        if start is not None:
            if strength is not None or num_inference_steps not in (None, 1):
                raise ValueError(f"this pipeline edits in one step from the source (source_start={start}); leave "
                                 "strength and num_inference_steps unset")
            num_inference_steps, strength = 1, 1.0
            sigmas = self._source_start_sigmas(start, h, 2 * w)
        elif strength is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")

        # One row per output, each instruction's images side by side: texts, tasks, canvases, generators agree.
        n, k = len(prompts), num_images_per_prompt
        seen = _pixels(_resize_sources(sources, (h, w)), (h, w), self.image_processor)  # (count, 3, h, w) in [0, 1]
        seen = seen.expand(n, -1, -1, -1) if seen.shape[0] == 1 else seen
        canvas, mask = self.diptych_canvas(seen.repeat_interleave(k, 0))
        tasks = None
        if self._routes_by_task():
            tasks = [t for t in self.resolve_tasks(prompts, task) for _ in range(k)]
        elif task is not None:
            self.resolve_tasks(prompts, task)  # an unknown task name is still an error
        texts = [template.format(instruction=p) for p in prompts for _ in range(k)]
        if start is not None:
            latents = self._pack_pixels(canvas * 2 - 1)  # the canvas itself is the start of a one-step edit
        out = self(prompt=texts, image=canvas, mask_image=mask, height=h, width=2 * w, strength=strength or 1.0,
                   num_inference_steps=num_inference_steps or self.default_num_inference_steps, sigmas=sigmas,
                   guidance_scale=self.default_guidance_scale if guidance_scale is None else guidance_scale,
                   generator=generator, latents=latents, output_type="latent" if output_type == "latent" else "pt",
                   joint_attention_kwargs=joint_attention_kwargs, callback_on_step_end=callback_on_step_end,
                   callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                   max_sequence_length=max_sequence_length, task=tasks, lora_index=lora_index,
                   auto_lora_top_k=auto_lora_top_k, auto_lora_fusion=auto_lora_fusion,
                   auto_lora_min_score=auto_lora_min_score)
        if output_type == "latent":
            return out if return_dict else (out.images,)
        right = out.images[..., w:]  # (N, 3, h, w) in [0, 1]: the edited half
        if start is not None:  # read on the source's grid: the caller's picture plus the change, at its size
            right = self._with_change_at(right, sources, seen[:count], wanted)
        images = self.image_processor.postprocess(right * 2 - 1, output_type=output_type)
        return FluxPipelineOutput(images=images) if return_dict else (images,)


def _check_mask(image, mask_image) -> None:
    """A mask must cover the image it masks: same height and width (PIL, array or tensor)."""
    if image is None or mask_image is None:
        return

    def size(x):
        if isinstance(x, (list, tuple)):
            x = x[0] if x else None
        if x is None:
            return None
        if isinstance(x, Image.Image):  # (W, H)
            return tuple(x.size[::-1])
        if hasattr(x, "shape"):
            shape = tuple(x.shape)
            if len(shape) == 2:
                return shape
            if len(shape) == 3:  # (C, H, W) tensors, (H, W, C) arrays
                return shape[1:] if torch.is_tensor(x) else shape[:2]
            return shape[-2:] if torch.is_tensor(x) else shape[1:3]
        return None

    a, b = size(image), size(mask_image)
    if a is not None and b is not None and a != b:
        raise ValueError(f"mask_image is {b[1]}x{b[0]} but image is {a[1]}x{a[0]}: the mask must have the image's size")

