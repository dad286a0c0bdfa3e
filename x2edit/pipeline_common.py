"""What x2edit's two editing pipelines share: ``X2EditPipeline`` (FLUX Kontext, reference tokens) and
``X2EditDiptychPipeline`` (FLUX Fill, a [source | edit] canvas).

- ``X2EditPipelineMixin``: the task of each instruction (``task=`` or the task classifier) routed to the
  MoE-LoRA; the sentence-encoder text layout (all-MiniLM-L6-v2 in place of CLIP + T5); x2edit adapters
  loaded, saved with the pipeline (``x2edit_adapter/NAME.safetensors``) and read for their settings
  (one-step ``source_start``, trained text length); the result at the caller's size (``_with_change_at``).
- input checks and sizes as module functions (``_check_instructions``, ``_check_sources``, ``_fit``, ...).

The mixin goes before the diffusers pipeline in the bases, so ``super().encode_prompt`` is stock's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from x2edit.adapters import (
    adapter_config,
    adapter_layers,
    adapter_names,
    load_adapter,
    remove_adapter,
    routing_context,
    save_adapter,
)
from x2edit.adapters.community import COMMUNITY
from x2edit.adapters.inject import _set_submodule
from x2edit.images import MAX_PIXELS, MIN_SIDE, as_rgb_image
from x2edit.schedulers import unshifted_sigma
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


class X2EditPipelineMixin:
    """Tasks, the sentence-encoder text layout, x2edit adapters and saving, for a FLUX pipeline subclass.

    Needs the diffusers pipeline's ``transformer``, ``tokenizer``, ``text_encoder(_2)``, ``image_processor``
    and ``vae_scale_factor``; ``__init__`` of the subclass calls ``_init_x2edit_state()``.
    """

    editing_mode: str  # each pipeline's: "edit" (Kontext layout) or "diptych" (Fill), as the registry names the modes
    default_max_sequence_length: int = 512  # unless the active adapters record their trained length
    # A base trained to edit in one step from the source records the noise level (unless an active adapter
    # sets its own); None: sampled from noise, as stock.
    default_source_start: float | None = None
    # An edit read on the source's grid (one-step, residual) comes back as the caller's picture plus the
    # model's change, at the caller's size; a change whose every channel stays within this (of 1) is noise,
    # and the picture is kept there as it was. 0: every change kept.
    change_floor: float = 0.0

    def _init_x2edit_state(self) -> None:
        self._task_classifier = None
        self._truncation_warned = False  # warn once per pipeline: training calls encode_prompt every batch
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

    def _pack_pixels(self, pixels: torch.Tensor, device=None) -> torch.Tensor:
        """Packed latents (N, T, 4C) in the transformer's dtype of images (N, 3, H, W) in [-1, 1], encoded on
        ``device`` (default: the pipeline's) without sampling noise (the VAE's mode), shifted and scaled as the
        pipeline's own latents."""
        pixels = pixels.to(device=device or self._execution_device, dtype=self.vae.dtype)
        z = self._encode_vae_image(pixels, generator=None)  # (N, C, h, w)
        b, c, h, w = z.shape
        return self._pack_latents(z.to(self.transformer.dtype), b, c, h, w)

    @contextlib.contextmanager
    def _call_hooks(self, prompts: list[str] | None, routing, reading, joint_attention_kwargs: dict | None, **auto):
        """The contexts a call runs the stock loop under, in order: AutoLoRA (``auto``: lora_index= and the
        auto_lora_* arguments; entered first, so the routing and the reading see its LoRAs), the task
        ``routing``, the adapters' ``reading`` (transient merge, residual reading) and the community LoRAs'
        ``joint_attention_kwargs={"scale": s}`` (``x2edit.pipeline_lora``)."""
        with self._lora_fusion_call(prompts, auto), routing, reading, self._community_lora_scale(joint_attention_kwargs):
            yield

    def _source_start_sigmas(self, start: float, height: int, width: int, steps: int = 1) -> list[float]:
        """The sigmas to pass stock's loop so that its ``steps`` Euler steps run from noise level ``start`` to 0
        at start, start (steps - 1) / steps, ..., start / steps (the scheduler appends 0) for a height x width
        sample: stock shifts the sigmas it is given (dynamically, by the token count, on FLUX's scheduler), so
        each is passed unshifted."""
        mu, cfg = None, self.scheduler.config
        if cfg.get("use_dynamic_shifting"):  # the shift the stock pipeline will apply at this size
            tokens = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
            mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                 cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return [unshifted_sigma(self.scheduler, start * (steps - i) / steps, mu) for i in range(steps)]

    def _task_routing(self, prompts: list[str] | None, task, n_prompts: int, num_images_per_prompt: int):
        """The context routing the MoE-LoRA by each instruction's task for a call (task ids in the batch's
        order: each instruction's images side by side); a null context without a task-routed adapter, where an
        unknown ``task`` name is still an error."""
        if self._routes_by_task():
            if prompts is None and task is None:
                raise ValueError("pass task= when calling with prompt_embeds: there is no instruction to classify")
            ids = self.resolve_tasks(prompts if prompts is not None else [""] * n_prompts, task)
            task_ids = torch.tensor(ids, dtype=torch.long).repeat_interleave(num_images_per_prompt)
            return routing_context(self.transformer, task_ids=task_ids)
        for t in (task if isinstance(task, (list, tuple)) else [task]) if task is not None else []:
            get_task(t)
        return contextlib.nullcontext()


# -- input checks and sizes (module level: they need no pipeline state) ------------------------------
def _check_positive(required: dict, optional: dict) -> None:
    """Each value of ``required`` a positive integer, and of ``optional`` too unless None (one-line
    ``ValueError`` naming the argument)."""
    for name, value in [*required.items(), *((k, v) for k, v in optional.items() if v is not None)]:
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
        if h * w > MAX_PIXELS:  # the same hard cap as a PIL source's (``as_rgb_image``)
            raise ValueError(f"image is {w}x{h} ({w * h / 1e6:.1f} MP), over the {MAX_PIXELS / 1e6:.1f} MP limit; "
                             "downscale it first")
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
