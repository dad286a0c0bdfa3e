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
   the loop from the source tokens at noise level s and take one step (``prepare_latents``);
9. instructions are encoded to the text length the active adapters were trained with (``text_length``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from x2edit.adapters import (
    adapter_config,
    adapter_layers,
    adapter_names,
    load_adapter,
    remove_adapter,
    residual_adapters,
    residual_reading,
    routing_context,
    save_adapter,
    static_merge,
)
from x2edit.adapters.community import COMMUNITY
from x2edit.adapters.inject import _set_submodule
from x2edit.images import MIN_SIDE, as_rgb_image
from x2edit.pipeline_lora import X2EditLoraMixin
from x2edit.pixel_vae import PixelShuffleVAE  # noqa: F401 (diffusers loads saved components only from imported modules)
from x2edit.schedulers import FlowMatchSampleScheduler, prediction_type, unshifted_sigma  # noqa: F401 (same reason)
from x2edit.tasks import get_task

logger = logging.getLogger(__name__)

ADAPTER_DIR = "x2edit_adapter"
CLASSIFIER_FILE = "task_classifier.safetensors"  # optional: prototypes fitted to this model's data
MAX_INSTRUCTION_CHARS = 2000


@contextlib.contextmanager
def _without_adapter_wrappers(model):
    """Temporarily put the plain base linears back, so the model saves as stock diffusers weights."""
    wrapped = list(adapter_layers(model))
    for name, layer in wrapped:
        if layer.merged:
            raise ValueError(f"adapters {list(layer.merged)} are merged into {name}: unmerge before saving")
        _set_submodule(model, name, layer.base_layer)
    try:
        yield
    finally:
        for name, layer in wrapped:
            _set_submodule(model, name, layer)


class X2EditPipeline(X2EditLoraMixin, FluxKontextPipeline):
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
    # What a call that passes None gets: stock Kontext's values, or what a bundled model records in its
    # x2edit_embedded.json (the registry sets them on loading; x2edit-tiny: 1 step, 64x64 pixels).
    default_num_inference_steps: int = 28
    default_max_area: int = 1024**2
    default_max_sequence_length: int = 512  # unless the active adapters record their trained length
    # A base trained to edit (``x2edit train`` mode edit_base) records how: in one step from the source at
    # this noise level (unless an active adapter sets its own), and whether the source also enters as
    # reference tokens. Stock Kontext: from noise, with reference tokens.
    default_source_start: float | None = None
    reference_tokens: bool = True
    # An edit read on the source's grid (one-step, residual) comes back as the caller's picture plus the
    # model's change, at the caller's size; a change whose every channel stays within this (of 1) is noise,
    # and the picture is kept there as it was. 0: every change kept.
    change_floor: float = 0.0

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, text_encoder_2=None, tokenizer_2=None,
                 image_encoder=None, feature_extractor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self._task_classifier = None
        self._truncation_warned = False  # warn once per pipeline: training calls encode_prompt every batch
        self._start_from_source = False  # set for the length of a call by a one-step adapter
        self._size_warned = False  # warn once per pipeline when the default max_area shrinks an image

    # -- tasks -------------------------------------------------------------------------------
    @property
    def task_classifier(self):
        """Callable ``list[str] -> list[str]``; the bundled MiniLM classifier unless one is set."""
        if self._task_classifier is None:
            from x2edit.task_classifier import TaskClassifier

            self._task_classifier = TaskClassifier()
        return self._task_classifier

    def set_task_classifier(self, classifier) -> None:
        self._task_classifier = classifier

    def resolve_tasks(self, prompts: list[str], task) -> list[int]:
        """Task ids for the prompts: from ``task`` (a name/id or one per prompt) or the classifier."""
        if task is None:
            task = self.task_classifier(prompts)
        tasks = task if isinstance(task, (list, tuple)) else [task] * len(prompts)
        if len(tasks) != len(prompts):
            raise ValueError(f"got {len(tasks)} tasks for {len(prompts)} instructions")
        return [get_task(t).id for t in tasks]

    # -- text encoding -------------------------------------------------------------------------
    def _warn_truncation(self, prompts: list[str], max_len: int) -> None:
        cut = sum(len(ids) > max_len for ids in self.tokenizer(prompts)["input_ids"])
        if cut:
            self._truncation_warned = True  # once per pipeline: training encodes a batch every step
            logger.warning("%d of %d instructions truncated to %d tokens (reported once per pipeline)", cut,
                           len(prompts), max_len)

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                      pooled_prompt_embeds=None, max_sequence_length: int = 512, lora_scale=None):
        """(prompt_embeds (B*n, L, D), pooled_prompt_embeds (B*n, D), text_ids (L, 3)) for B instructions.

        CLIP + T5 as stock Kontext, or the sentence-encoder layout (``text_encoder_2`` None). Given
        embeddings are one row per instruction and are repeated per image, as computed ones are.
        """
        device = device or self._execution_device
        given = prompt_embeds is not None
        if self.text_encoder_2 is not None:
            # Encoded where T5 lives (a trainer may keep it on the CPU: model.text_encoder_device), then moved.
            where = device if given else self.text_encoder_2.device
            prompt_embeds, pooled_prompt_embeds, text_ids = (t.to(device) for t in super().encode_prompt(
                prompt, prompt_2, where, num_images_per_prompt, prompt_embeds, pooled_prompt_embeds,
                max_sequence_length, lora_scale))
            repeat = num_images_per_prompt if given else 1  # stock repeats only what it computes
        else:
            if not given:
                prompt = [prompt] if isinstance(prompt, str) else prompt
                max_len = min(max_sequence_length, self.tokenizer.model_max_length)
                tok = self.tokenizer(prompt, padding="max_length", max_length=max_len, truncation=True,
                                     return_tensors="pt")
                if not self._truncation_warned and (tok.attention_mask[:, -1] == 1).any():  # full rows: maybe cut
                    self._warn_truncation(prompt, max_len)
                enc_device = self.text_encoder.device
                mask = tok.attention_mask.to(enc_device)
                states = self.text_encoder(input_ids=tok.input_ids.to(enc_device), attention_mask=mask)[0]  # (B, L, D)
                m = mask[..., None].to(states.dtype)
                prompt_embeds = states * m  # padding positions carry nothing
                pooled_prompt_embeds = (states * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D), sentence-transformers pooling
            dtype = self.transformer.dtype if self.transformer is not None else prompt_embeds.dtype
            prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
            pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype)
            text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
            repeat = num_images_per_prompt
        if repeat > 1:  # each instruction's images side by side, [A, A, B, B], as task ids and sources
            prompt_embeds = prompt_embeds.repeat_interleave(repeat, 0)
            pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(repeat, 0)
        return prompt_embeds, pooled_prompt_embeds, text_ids

    # -- adapters ------------------------------------------------------------------------------
    def load_adapter(self, path: str | os.PathLike, adapter_name: str = "default", replace: bool = False):
        """Load an x2edit adapter file (MoE-LoRA or LoRA) into the transformer.

        replace: then remove the pipeline's other x2edit adapters (e.g. x2edit-tiny's own), so this one
            alone edits; community LoRAs stay. Nothing is removed if loading fails.
        """
        others = [n for n in adapter_names(self.transformer) if n != adapter_name
                  and adapter_config(self.transformer, n).extra.get("source") != COMMUNITY] if replace else []
        config = load_adapter(self.transformer, path, adapter_name)
        for name in others:
            remove_adapter(self.transformer, name)
        return config

    def _routes_by_task(self) -> bool:
        for name in adapter_names(self.transformer):
            cfg = adapter_config(self.transformer, name)
            if cfg.kind == "moe_lora":
                return True
        return False

    # -- saving --------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Save components as diffusers does, plus each x2edit adapter as ``x2edit_adapter/NAME.safetensors``."""
        with _without_adapter_wrappers(self.transformer):
            super().save_pretrained(save_directory, **kwargs)
        for name in adapter_names(self.transformer):
            if adapter_config(self.transformer, name).extra.get("source") == COMMUNITY:
                logger.warning("community LoRA %r is not saved with the pipeline; load it again with "
                               "load_lora_weights", name)
                continue
            save_adapter(self.transformer, Path(save_directory) / ADAPTER_DIR / f"{name}.safetensors", name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        adapter_dir = Path(pretrained_model_name_or_path) / ADAPTER_DIR
        if adapter_dir.is_dir():
            for f in sorted(adapter_dir.glob("*.safetensors")):
                load_adapter(pipe.transformer, f, f.stem)
        classifier = Path(pretrained_model_name_or_path) / CLASSIFIER_FILE
        if classifier.is_file():
            from x2edit.task_classifier import TaskClassifier

            pipe.set_task_classifier(TaskClassifier.load(classifier))
        return pipe

    # -- editing -------------------------------------------------------------------------------
    def _active_setting(self, field: str, disagreement: str, fix: str = "activate one of them (set_adapters)"):
        """The one value of ``AdapterConfig.<field>`` among the active adapters (None if none sets it)."""
        values = {getattr(layer.adapters[n].config, field) for _, layer in adapter_layers(self.transformer)
                  for n in layer.active_adapters} - {None}
        if len(values) > 1:
            raise ValueError(f"the active adapters {disagreement} {sorted(values)}; {fix}")
        return values.pop() if values else None

    def source_start(self) -> float | None:
        """The noise level the pipeline edits from in one step: the active adapters'
        (``AdapterConfig.source_start``), else the base's own (``default_source_start``)."""
        start = self._active_setting("source_start", "start from the source at different noise levels")
        return self.default_source_start if start is None else start

    def text_length(self) -> int:
        """Text tokens per instruction when a call passes no ``max_sequence_length``: the length the active
        adapters were trained with (``AdapterConfig.max_sequence_length``), else ``default_max_sequence_length``."""
        trained = self._active_setting("max_sequence_length", "were trained with different text lengths",
                                       "pass max_sequence_length= or activate one of them (set_adapters)")
        return self.default_max_sequence_length if trained is None else trained

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

    def _requested_size(self, source: tuple[int, int] | None, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) the caller asks for, before any cap: as given; a missing side keeps the source's
        aspect ratio; neither: the source's size (without a source: the model's default side)."""
        if source is None:
            side = self.default_sample_size * self.vae_scale_factor
            return height or side, width or side
        if height is None and width is None:
            return source
        if height is None:
            return max(1, round(width * source[0] / source[1])), width
        if width is None:
            return height, max(1, round(height * source[1] / source[0]))
        return height, width

    def _with_change_at(self, edited: torch.Tensor, sources, seen, size: tuple[int, int]) -> torch.Tensor:
        """The sources at ``size`` plus the change the model made to them at its working size.

        Args:
            edited: (N, 3, h, w) the model's outputs in [0, 1], each instruction's images side by side.
            sources: the caller's sources (PIL images or a (n, 3, H', W') tensor), n = 1 or one per instruction.
            seen: the same sources at the working size, as the model read them.
            size: (height, width) of the result, of the sources' aspect ratio.
        The change (output - what the model saw) is zeroed where no channel moves by more than
        ``change_floor``, then upsampled bilinearly: where the model changes nothing the result is the
        caller's picture, pixel for pixel, at its own resolution (a small model edits at 64x64 pixels).
        """
        source, low = _pixels(sources, size, self.image_processor), _pixels(seen, edited.shape[-2:], self.image_processor)
        rows = edited.shape[0] // source.shape[0]
        change = edited.float() - low.to(edited.device).repeat_interleave(rows, 0)
        if self.change_floor:
            change = change * (change.abs().amax(1, keepdim=True) > self.change_floor)
        if tuple(change.shape[-2:]) != tuple(size):
            change = torch.nn.functional.interpolate(change, size=size, mode="bilinear", align_corners=False)
        return (source.to(edited.device).repeat_interleave(rows, 0) + change).clamp(0, 1)

    def _warn_capped(self, what: str, size: tuple[int, int], used: tuple[int, int], max_area: int) -> None:
        if self._size_warned or size[0] * size[1] <= max_area:
            return
        self._size_warned = True  # once per pipeline: every photo given to a small model would say it again
        logger.warning("%s is %dx%d, more than this pipeline's working area of %d pixels (about %dx%d): editing at "
                       "%dx%d; pass max_area= (x2edit edit: --max-area) to change it (reported once per pipeline)",
                       what, size[1], size[0], max_area, math.isqrt(max_area), math.isqrt(max_area), used[1], used[0])

    def _source_tokens(self, image, batch_size: int) -> torch.Tensor:
        """Packed latents (B, T, C) of the sources (already at the output's size), one row per image of the
        batch (each instruction's images side by side): the start of a one-step edit without reference tokens."""
        device, dtype = self._execution_device, self.transformer.dtype
        pixels = self.image_processor.preprocess(image)  # (N, 3, H, W) in [-1, 1]
        z = self._encode_vae_image(pixels.to(device=device, dtype=self.vae.dtype), generator=None)  # argmax: no noise
        z = z.repeat_interleave(batch_size // z.shape[0], dim=0).to(dtype)
        b, c, h, w = z.shape
        return self._pack_latents(z, b, c, h, w)

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
                bundled model may record its own). One-step adapters take exactly one and refuse others.
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
        if num_images_per_prompt is None or isinstance(num_images_per_prompt, bool) \
                or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        for name, value in (("height", height), ("width", width), ("max_area", max_area)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
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
            if num_inference_steps not in (None, 1):
                raise ValueError(f"this pipeline's adapter edits in one step from the source (source_start={start}); "
                                 f"num_inference_steps={num_inference_steps} is not supported, leave it unset")
            for key, value in (("latents", latents if self.reference_tokens else None), ("sigmas", sigmas)):
                if value is not None:
                    raise ValueError(f"{key}= cannot be given to a one-step adapter: it starts from the source at "
                                     f"noise level {start}")
            mu, cfg = None, self.scheduler.config
            if cfg.get("use_dynamic_shifting"):  # the shift FluxKontextPipeline will apply at this size
                tokens = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
                mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            num_inference_steps, sigmas = 1, [unshifted_sigma(self.scheduler, start, mu)]
        elif num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps

        # 3. Routing by task (ids in the order of the batch: each instruction's images side by side).
        routing = contextlib.nullcontext()
        if self._routes_by_task():
            if prompts is None and task is None:
                raise ValueError("pass task= when calling with prompt_embeds: there is no instruction to classify")
            ids = self.resolve_tasks(prompts if prompts is not None else [""] * n_prompts, task)
            task_ids = torch.tensor(ids, dtype=torch.long).repeat_interleave(num_images_per_prompt)
            routing = routing_context(self.transformer, task_ids=task_ids)
        elif task is not None:  # no router to feed, but an unknown task name is still an error
            for t in task if isinstance(task, (list, tuple)) else [task]:
                get_task(t)
        # Static adapters (plain and community LoRAs, a task-routed MoE-LoRA on a one-task batch) are folded
        # into transient merged weights for the loop where that is cheaper than the low-rank term at every
        # step (kernels' cost rule); the base weights are not written. Not under the residual reading, whose
        # calls switch adapters off and on within each step.
        reading = static_merge(self.transformer, calls=num_inference_steps)
        if residual_adapters(self.transformer):
            if prediction_type(self.scheduler) != "flow":
                raise ValueError("a residual-reading adapter needs a flow (velocity) base; this base's scheduler reads "
                                 f"its output as {prediction_type(self.scheduler)!r}")
            reading = residual_reading(self.transformer)

        # 4. Stock Kontext from here: text encoding, latents, timesteps, loop, decode.
        self._start_from_source = start is not None
        try:
            # LoRA hook: joint_attention_kwargs={"scale": s} scales the community LoRAs (pipeline_lora.py)
            # AutoLoRA hook: lora_index= / auto_lora_top_k= retrieve and load LoRAs, fuse_loras() gates them per
            # layer and step (pipeline_lora.py); entered first, so the routing and the reading see them
            auto = {"lora_index": lora_index, "auto_lora_top_k": auto_lora_top_k, "auto_lora_fusion": auto_lora_fusion,
                    "auto_lora_min_score": auto_lora_min_score}
            with self._lora_fusion_call(prompts, auto), routing, reading, \
                    self._community_lora_scale(joint_attention_kwargs):
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


# -- input checks and sizes (module level: they need no pipeline state) ------------------------------
def _check_instructions(prompt) -> list[str] | None:
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError("the instruction is empty: say what to change, e.g. 'make the car red'")
        if len(p) > MAX_INSTRUCTION_CHARS:
            raise ValueError(f"the instruction has {len(p)} characters; the limit is {MAX_INSTRUCTION_CHARS}")
    return prompts


def _check_sources(image):
    """(sources, how many, (height, width) of the first) for a call's ``image``; (None, 0, None) without one.

    Tensors stay tensors, (B, 3, H, W) in [0, 1]; everything else becomes RGB PIL images (``as_rgb_image``).
    """
    if image is None:
        return None, 0, None
    if torch.is_tensor(image):
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
            raise ValueError(f"an image tensor must be float (B, 3, H, W) or (3, H, W), got {image.dtype} "
                             f"{tuple(image.shape)}")
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"image tensor values must be in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
        h, w = image.shape[-2:]
        if min(h, w) < MIN_SIDE:
            raise ValueError(f"image is {w}x{h}: both sides must be at least {MIN_SIDE} pixels")
        return image, image.shape[0], (h, w)
    if isinstance(image, (list, tuple)):
        image = [as_rgb_image(im, f"image {i}") for i, im in enumerate(image)]
        if not image:
            raise ValueError("image is an empty list")
        for i, im in enumerate(image[1:], 1):  # one batch tensor: every source at one size, unstretched
            if not _same_aspect(im.size[::-1], image[0].size[::-1]):
                raise ValueError(f"source image {i} is {im.size[0]}x{im.size[1]}, another aspect ratio than source 0 "
                                 f"({image[0].size[0]}x{image[0].size[1]}): edit it in a separate call")
        return image, len(image), image[0].size[::-1]
    image = as_rgb_image(image)
    return image, 1, image.size[::-1]


def _fit(height: int, width: int, max_area: int, grid: int, what: str) -> tuple[int, int]:
    """(height, width) scaled down to at most ``max_area`` pixels (never up), rounded down to ``grid``."""
    scale = min(1.0, (max_area / (height * width)) ** 0.5)
    h, w = int(height * scale) // grid * grid, int(width * scale) // grid * grid
    if h == 0 or w == 0:
        capped = f" capped at max_area={max_area}" if scale < 1 else ""
        raise ValueError(f"{what} {width}x{height}{capped} is smaller than the model's {grid}-pixel grid")
    return h, w


def _same_aspect(size: tuple[int, int], source: tuple[int, int]) -> bool:
    """Whether ``size`` (height, width) has the aspect ratio of ``source`` to within one pixel of ``size``:
    |h - w * sh / sw| <= 1 or |w - h * sw / sh| <= 1, the best a whole-pixel size can do."""
    (h, w), (sh, sw) = size, source
    return abs(h * sw - w * sh) <= max(sh, sw)


def _pixels(image, size: tuple[int, int], processor) -> torch.Tensor:
    """(n, 3, H, W) float in [0, 1] of sources (PIL images or a tensor in [0, 1]) at ``size`` (H, W)."""
    image = _resize_sources(image, size)
    if torch.is_tensor(image):
        return image.float()
    return processor.numpy_to_pt(processor.pil_to_numpy(image if isinstance(image, list) else [image]))


def _resize_sources(image, size: tuple[int, int]):
    """Every source at ``size`` (height, width)."""
    h, w = size
    if torch.is_tensor(image):
        if tuple(image.shape[-2:]) == (h, w):
            return image
        return torch.nn.functional.interpolate(image, size=(h, w), mode="bilinear", antialias=True,
                                               align_corners=False).clamp(0, 1)
    resize = lambda im: im if im.size == (w, h) else im.resize((w, h))  # noqa: E731
    return [resize(im) for im in image] if isinstance(image, list) else resize(image)
