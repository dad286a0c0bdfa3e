"""X2EditPipeline: instruction-based editing with task-routed MoE-LoRA on a FLUX-family transformer.

It is diffusers' ``FluxKontextPipeline`` (check_inputs -> encode_prompt -> prepare_latents ->
timesteps -> denoising loop -> decode, with the source image appended as reference tokens whose
first position-id coordinate is 1) plus what editing with X2Edit adapters needs:

1. inputs are validated (image mode/size, non-empty instruction, known task) with one-line errors;
2. the task of each instruction comes from ``task=`` or the task classifier, and is fed to the
   MoE-LoRA routers through ``routing_context`` for the whole denoising loop;
3. the output keeps the source's size (rounded to the model's grid, capped at ``max_area``); the source is
   encoded at its own aspect ratio, or on the output's grid for adapters that read it there
   (``_edit_size``); the i-th source goes with the i-th instruction and task (``prepare_latents``);
4. a single sentence encoder may replace CLIP + T5 (the x2edit-tiny layout: all-MiniLM-L6-v2);
5. ``save_pretrained`` / ``from_pretrained`` carry the adapter (``x2edit_adapter/NAME.safetensors``);
6. community LoRAs load beside the MoE-LoRA with ``load_lora_weights`` and run in the same fused call;
   diffusers' LoRA and adapter methods act on x2edit's adapter layers (``x2edit.pipeline_lora``);
7. adapters with the residual reading (``x2edit.adapters.residual``) are read as the change they make
   to the source, by wrapping the transformer for the call; the loop and scheduler stay stock.
8. adapters trained to edit in one step from the source (``AdapterConfig.source_start`` = s) start
   the loop from the source tokens at noise level s (``prepare_latents``) and take one step, or n Euler
   steps at s, s (n-1)/n, ..., s/n down to 0 (``num_inference_steps``, ``_source_start_sigmas``);
9. instructions are encoded to the text length the active adapters were trained with (``text_length``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from x2edit.adapters import residual_adapters, residual_reading, static_merge
from x2edit.pipeline_common import (
    X2EditPipelineMixin,
    _check_instructions,
    _check_positive,
    _check_sources,
    _fit,
    _resize_sources,
    _same_aspect,
)
from x2edit.pipeline_lora import X2EditLoraMixin
from x2edit.pixel_vae import PixelShuffleVAE  # noqa: F401 (diffusers loads saved components only from imported modules)
from x2edit.schedulers import FlowMatchSampleScheduler, prediction_type  # noqa: F401 (same reason)


class X2EditPipeline(X2EditPipelineMixin, X2EditLoraMixin, FluxKontextPipeline):
    """Edit images from instructions with a FLUX-family transformer and X2Edit adapters.

    Components are those of ``FluxKontextPipeline``; ``text_encoder_2``/``tokenizer_2`` may be None,
    in which case ``text_encoder`` is a sentence encoder whose token states form the text sequence
    and whose masked mean is the pooled embedding.

    Adapters of two kinds: the x2edit editing adapter (``load_adapter``, ``from_pretrained``) is part
    of the model; community LoRAs come in with ``load_lora_weights``. diffusers' *LoRA* methods
    (``unload_lora_weights``, ``fuse_lora`` / ``unfuse_lora``, ``disable_lora`` / ``enable_lora``, the
    ``scale`` of ``joint_attention_kwargs``) act on the community LoRAs only, as on stock
    ``FluxKontextPipeline``; the *adapter* methods (``set_adapters``, ``get_list_adapters``,
    ``get_active_adapters``, ``delete_adapters``) see both kinds. See ``x2edit.pipeline_lora``.
    """

    _optional_components = ["text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor"]
    editing_mode = "edit"
    # What a call that passes None gets: stock Kontext's values, or what a bundled model records in its
    # x2edit_embedded.json (the registry sets them on loading; x2edit-tiny: 1 step, 64x64 pixels).
    default_num_inference_steps: int = 28
    default_max_area: int = 1024**2
    # A base trained to edit (``x2edit train`` mode edit_base) records whether the source also enters as
    # reference tokens beside its ``default_source_start`` (X2EditPipelineMixin). Stock Kontext: yes.
    reference_tokens: bool = True

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, text_encoder_2=None, tokenizer_2=None,
                 image_encoder=None, feature_extractor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self._init_x2edit_state()
        self._start_from_source = False  # set for the length of a call by a one-step adapter

    def _needs_source_on_output_grid(self) -> bool:
        """Residual and one-step adapters read the source token by token as the output's own tokens."""
        return self.source_start() is not None or bool(residual_adapters(self.transformer))

    def _edit_size(self, source: tuple[int, int] | None, height: int | None, width: int | None, max_area: int,
                   on_grid: bool, warn: bool = False) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """((height, width) of the output, (height, width) the source is encoded at, or None without one).

        Both are capped at ``max_area`` pixels (never enlarged) and rounded down to the model's grid. The
        output is ``height`` x ``width``; a missing side keeps the source's aspect ratio (without a source:
        the model's default side). The source keeps its own aspect ratio, as in stock Kontext; adapters
        that read it on the output's grid (``on_grid``) get it at the output's size, which must then have
        the source's aspect ratio: stretching it would edit a distorted image. ``warn``: ``max_area`` is
        the pipeline's default, so say (once) when it shrinks the source or a size the caller asked for.
        """
        grid = self.vae_scale_factor * 2
        asked = height is not None or width is not None
        height, width = self._requested_size(source, height, width)
        out = encode = _fit(height, width, max_area, grid, "the output size")
        if source is None:
            encode = None
        elif not on_grid:
            encode = _fit(*source, max_area, grid, "the source image")
        elif not _same_aspect((height, width), source):
            raise ValueError(f"this pipeline's adapter reads the source on the output's grid, and a {width}x{height} "
                             f"output would stretch the {source[1]}x{source[0]} source: give a height/width of the "
                             "source's aspect ratio (or leave them unset)")
        # (on the grid, the source is scaled onto the output's size: the same rounding as the output's own)
        if warn and source is not None and not on_grid:  # on the grid the change comes back at the asked size
            self._warn_capped("the source image", source, encode, max_area)
        if warn and asked and not on_grid:
            self._warn_capped("the requested output", (height, width), out, max_area)
        return out, encode

    def _source_tokens(self, image, batch_size: int) -> torch.Tensor:
        """Packed latents (B, T, C) of the sources (already at the output's size), one row per image of the
        batch (each instruction's images side by side): the start of a one-step edit without reference tokens."""
        tokens = self._pack_pixels(self.image_processor.preprocess(image))  # from (N, 3, H, W) in [-1, 1]
        return tokens.repeat_interleave(batch_size // tokens.shape[0], dim=0)

    def prepare_latents(self, image, batch_size, num_channels_latents, height, width, dtype, device, generator=None,
                        latents=None):
        # Stock repeats several sources as whole batches, [A, B, A, B], while prompts and task ids repeat
        # per prompt, [A, A, B, B]: encode each source once and repeat it per prompt in the same order.
        if image is not None and 1 < image.shape[0] < batch_size and batch_size % image.shape[0] == 0:
            if image.shape[1] != self.latent_channels:  # pixels (N, 3, H, W) -> latents (N, C, h, w)
                image = self._encode_vae_image(image.to(device=device, dtype=dtype), generator=None)  # argmax: no noise
            image = image.repeat_interleave(batch_size // image.shape[0], dim=0)
        latents, image_latents, latent_ids, image_ids = super().prepare_latents(
            image, batch_size, num_channels_latents, height, width, dtype, device, generator, latents)
        if self._start_from_source and image_latents is not None:  # one-step edit: the packed source tokens
            latents = image_latents.clone()  # (B, T, C) are the start (without reference tokens: given as latents)
        return latents, image_latents, latent_ids, image_ids

    def edit(self, image, prompt, **kwargs):
        """The editing entry x2edit's pipelines share (``X2EditDiptychPipeline.edit`` edits on a diptych): here,
        the call itself, ``self(image=image, prompt=prompt, **kwargs)``."""
        return self(image=image, prompt=prompt, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock's default; never mutated)
        max_sequence_length: int | None = None,
        max_area: int | None = None,
        _auto_resize: bool = False,
        *,
        task: str | int | list[str | int] | None = None,
        lora_index=None,
        auto_lora_top_k: int | None = None,
        auto_lora_fusion=None,
        auto_lora_min_score: float | None = None,
    ):
        """Edit ``image`` following the instruction ``prompt``.

        The parameters are ``FluxKontextPipeline.__call__``'s, in its order and with its defaults, except
        where x2edit's default is the pipeline's own (``num_inference_steps``, ``max_sequence_length``,
        ``max_area``: None) or differs by design (``_auto_resize``), plus ``task``.

        Args:
            image: the source: a PIL image, a path, an HxWx3 uint8 array, a list of them (one per
                instruction, or one for all), or a float tensor (B, 3, H, W) or (3, H, W) in [0, 1].
                None generates from text alone, as the base text-to-image model.
            prompt: the instruction, or one per source (non-empty, at most 2000 characters). Or pass
                ``prompt_embeds``.
            prompt_2: the instruction for the second text encoder (T5); default: ``prompt``.
            negative_prompt, negative_prompt_2: what to steer away from; used when ``true_cfg_scale`` > 1.
            true_cfg_scale: real classifier-free guidance with ``negative_prompt`` when > 1 (two
                transformer calls per step).
            height, width: output size in pixels. Default: the source's size; one side alone keeps the
                source's aspect ratio. Both are capped at ``max_area`` and rounded down to the model's grid
                (``vae_scale_factor * 2`` pixels). The source keeps its own aspect ratio (as in stock
                Kontext); adapters that read the source on the output's grid (``AdapterConfig.reading ==
                "residual"`` or ``source_start`` set) refuse a height/width of another aspect ratio instead
                of stretching the source.
            num_inference_steps: denoising steps; None: ``default_num_inference_steps`` (28, FLUX's; a
                bundled model may record its own). A model that edits from the source (``source_start()`` = s)
                takes one by default, or n Euler steps at s, s (n-1)/n, ..., s/n: on x2edit-tiny more steps
                let an added community LoRA do more (+0.06 dB over the call without it in one step, +0.55 in
                two), while its editing adapter, trained for one step at s, loses 0.2 to 0.4 dB
                (``benchmarks/results/pipeline_steps``). Beside a
                residual-reading adapter the n steps follow the straight path from the source to its estimate
                (``residual_reading(start=s)``), so community LoRAs integrate as in the LoRA flow.
            sigmas: custom noise levels for the scheduler (not with one-step adapters).
            guidance_scale: the distilled guidance FLUX.1 [dev] / Kontext embed (ignored by models without
                guidance embedding).
            num_images_per_prompt: outputs per instruction; the i-th source always goes with the i-th
                instruction and task.
            generator: a torch generator, or one per output, for reproducible noise.
            latents: starting noise, packed (B, T, C); not with one-step adapters (they start from the source).
            prompt_embeds, pooled_prompt_embeds: precomputed text embeddings (B, L, D) and (B, D), one row
                per instruction (repeated per image here); then ``task=`` is needed to route the MoE-LoRA.
            ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image,
                negative_ip_adapter_image_embeds: inputs of a loaded FLUX IP-Adapter, as in diffusers.
            negative_prompt_embeds, negative_pooled_prompt_embeds: precomputed negative embeddings.
            output_type: "pil", "np", "pt" or "latent" (packed tokens).
            return_dict: return a ``FluxPipelineOutput`` (else a one-element tuple).
            joint_attention_kwargs: passed to the transformer's attention processors unchanged.
            callback_on_step_end: ``f(pipe, step, timestep, tensors) -> dict`` after each step; returned
                "latents" / "prompt_embeds" replace the pipeline's.
            callback_on_step_end_tensor_inputs: names of the tensors handed to the callback.
            max_sequence_length: text tokens per instruction (at most 512); None: the length the active
                adapters were trained with (``AdapterConfig.max_sequence_length``), else 512. Refused when
                active adapters disagree.
            max_area: cap on the output's and the source's pixel area (never enlarges, unlike stock Kontext,
                which scales to it); None: ``default_max_area`` (1024^2; x2edit-tiny: 64x64, its training
                size), with one warning per pipeline when it shrinks an image.
            _auto_resize: True encodes the source at the preferred FLUX.1 Kontext resolution nearest its
                aspect ratio (stock's default); x2edit's default False encodes it at its own size (capped).
            task: task name or id, or one per instruction, routing the MoE-LoRA; None classifies each
                instruction with ``task_classifier``.
            lora_index: an AutoLoRA index object (``x2edit.retrieval.LoraIndex(path)``, or anything with
                ``search(query, k, distinct)`` returning hits with a "file" and a "score"): the instruction
                retrieves distinct LoRAs from it, and those scoring at least ``auto_lora_min_score`` are loaded
                and fused for this call only (``pipe.retrieved_loras`` lists every hit and whether it was used).
            auto_lora_top_k: LoRAs to retrieve (default 3); needs ``lora_index``.
            auto_lora_fusion: how the retrieved LoRAs combine (``fuse_loras``' ``fusion``; default: the
                index's ``default_fusion``, the learned gate for a ``LoraIndex``).
            auto_lora_min_score: the cosine a hit needs to be fused (default: the index's ``min_score``, else
                ``x2edit.pipeline_lora.AUTO_LORA_MIN_SCORE``, 0.15); needs ``lora_index``.

        Returns:
            ``FluxPipelineOutput`` with ``images``, or ``(images,)`` when ``return_dict`` is False.
        """
        prompts = _check_instructions(prompt)
        _check_positive({"num_images_per_prompt": num_images_per_prompt},
                        {"height": height, "width": width, "max_area": max_area,
                         "num_inference_steps": num_inference_steps})
        start = self.source_start()
        on_grid = self._needs_source_on_output_grid()
        if on_grid and image is None:
            what = f"edits in one step from the source (source_start={start})" if start is not None \
                else "edits a source image (residual reading)"
            raise ValueError(f"this pipeline's adapter {what}: pass image=")
        if on_grid and _auto_resize:
            raise ValueError("_auto_resize=True encodes the source at a Kontext resolution, but this pipeline's adapter "
                             "reads it on the output's grid: leave _auto_resize unset")
        if not self.reference_tokens and start is None:
            raise ValueError("this base reads the source only as the sample of a one-step edit (no reference tokens), "
                             "but no noise level to start from is set (default_source_start)")
        if not self.reference_tokens and residual_adapters(self.transformer):
            raise ValueError(f"the residual adapters {residual_adapters(self.transformer)} read the source from "
                             "reference tokens, which this base is trained without")

        # 1. Sources (validated, one per instruction or one for all) and sizes.
        image, count, source = _check_sources(image)
        n_prompts = len(prompts) if prompts is not None else (prompt_embeds.shape[0] if prompt_embeds is not None else 1)
        if count not in (0, 1, n_prompts):
            raise ValueError(f"got {count} source images for {n_prompts} instructions: pass one image, or one per "
                             "instruction")
        cap = self.default_max_area if max_area is None else max_area
        wanted = self._requested_size(source, height, width)
        (height, width), encode = self._edit_size(source, height, width, cap, on_grid, warn=max_area is None)
        sources = image  # the caller's pictures, at their own size
        if image is not None and not _auto_resize:
            image = _resize_sources(image, encode)
        # Read on the source's grid, the result is the caller's picture plus the model's change, at the size asked.
        seen, compose = image, on_grid and image is not None and output_type != "latent"
        if not self.reference_tokens:  # the source is the starting sample and nothing else: no reference tokens
            latents, image = self._source_tokens(image, n_prompts * (num_images_per_prompt or 1)), None

        # 2. Text length, steps and the one-step schedule.
        if max_sequence_length is None:
            max_sequence_length = self.text_length()
        if start is not None:
            for key, value in (("latents", latents if self.reference_tokens else None), ("sigmas", sigmas)):
                if value is not None:
                    raise ValueError(f"{key}= cannot be given to a one-step adapter: it starts from the source at "
                                     f"noise level {start}")
            # One step by default (the editing adapter's training); n: Euler steps at s, s (n-1)/n, ..., s/n to 0.
            num_inference_steps = num_inference_steps or 1
            sigmas = self._source_start_sigmas(start, height, width, num_inference_steps)
        elif num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps

        # 3. Routing by task (ids in the order of the batch: each instruction's images side by side).
        routing = self._task_routing(prompts, task, n_prompts, num_images_per_prompt)
        # Static adapters (plain and community LoRAs, a task-routed MoE-LoRA on a one-task batch) are folded
        # into transient merged weights for the loop where that is cheaper than the low-rank term at every
        # step (kernels' cost rule); the base weights are not written. Not under the residual reading, whose
        # calls switch adapters off and on within each step.
        reading = static_merge(self.transformer, calls=num_inference_steps)
        if residual_adapters(self.transformer):
            if prediction_type(self.scheduler) != "flow":
                raise ValueError("a residual-reading adapter needs a flow (velocity) base; this base's scheduler reads "
                                 f"its output as {prediction_type(self.scheduler)!r}")
            reading = residual_reading(self.transformer, start=start)

        # 4. Stock Kontext from here: text encoding, latents, timesteps, loop, decode.
        self._start_from_source = start is not None
        try:
            with self._call_hooks(prompts, routing, reading, joint_attention_kwargs, lora_index=lora_index,
                                  auto_lora_top_k=auto_lora_top_k, auto_lora_fusion=auto_lora_fusion,
                                  auto_lora_min_score=auto_lora_min_score):
                out = super().__call__(
                    image=image, prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt,
                    negative_prompt_2=negative_prompt_2, true_cfg_scale=true_cfg_scale, height=height, width=width,
                    num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                    num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                    prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                    ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                    negative_ip_adapter_image=negative_ip_adapter_image,
                    negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, output_type="pt" if compose else output_type,
                    return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                    max_sequence_length=max_sequence_length, max_area=height * width, _auto_resize=_auto_resize)
        finally:
            self._start_from_source = False
        if not compose:
            return out
        images = self._with_change_at(out.images if return_dict else out[0], sources, seen, wanted)
        images = self.image_processor.postprocess(images * 2 - 1, output_type=output_type)  # from [-1, 1], as decoded
        return FluxPipelineOutput(images=images) if return_dict else (images,)
