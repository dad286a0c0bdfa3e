"""X2EditPipeline: instruction-based editing with task-routed MoE-LoRA on a FLUX-family transformer.

It is diffusers' ``FluxKontextPipeline`` (check_inputs -> encode_prompt -> prepare_latents ->
timesteps -> denoising loop -> decode, with the source image appended as reference tokens whose
first position-id coordinate is 1) plus what editing with X2Edit adapters needs:

1. inputs are validated (image mode/size, non-empty instruction, known task) with one-line errors;
2. the task of each instruction comes from ``task=`` or the task classifier, and is fed to the
   MoE-LoRA routers through ``routing_context`` for the whole denoising loop;
3. the output keeps the source's size (rounded to the model's multiple, capped at ``max_area``);
4. a single sentence encoder may replace CLIP + T5 (the x2edit-tiny layout: all-MiniLM-L6-v2);
5. ``save_pretrained`` / ``from_pretrained`` carry the adapter (``x2edit_adapter/NAME.safetensors``);
6. community LoRAs load beside the MoE-LoRA with ``load_lora_weights`` and run in the same fused call;
   diffusers' LoRA and adapter methods act on x2edit's adapter layers (``x2edit.pipeline_lora``);
7. adapters with the residual reading (``x2edit.adapters.residual``) are read as the change they make
   to the source, by wrapping the transformer for the call; the loop and scheduler stay stock.
8. adapters trained to edit in one step from the source (``AdapterConfig.source_start`` = s) start
   the loop from the source tokens at noise level s and take one step (``prepare_latents``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

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
)
from x2edit.adapters.community import COMMUNITY
from x2edit.adapters.inject import _set_submodule
from x2edit.images import as_rgb_image
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
    # Steps used when the caller gives none: FLUX's 28, or what a bundled model was measured best at
    # (x2edit-tiny records it in x2edit_embedded.json; the registry sets it on loading).
    default_num_inference_steps: int = 28

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, text_encoder_2=None, tokenizer_2=None,
                 image_encoder=None, feature_extractor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self._task_classifier = None
        self._truncation_warned = False  # warn once per pipeline: training calls encode_prompt every batch
        self._start_from_source = False  # set for the length of a call by a one-step adapter

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
        if self.text_encoder_2 is not None:
            return super().encode_prompt(prompt, prompt_2, device, num_images_per_prompt, prompt_embeds,
                                         pooled_prompt_embeds, max_sequence_length, lora_scale)
        device = device or self._execution_device
        if prompt_embeds is None:
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
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, 0)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(
            num_images_per_prompt, 0)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
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
    def source_start(self) -> float | None:
        """The noise level the active adapters edit from in one step (``AdapterConfig.source_start``)."""
        levels = {layer.adapters[n].config.source_start for _, layer in adapter_layers(self.transformer)
                  for n in layer.active_adapters} - {None}
        if len(levels) > 1:
            raise ValueError(f"the active adapters start from the source at different noise levels {sorted(levels)}; "
                             "activate one of them (set_adapters)")
        return levels.pop() if levels else None

    def prepare_latents(self, image, *args, **kwargs):
        latents, image_latents, latent_ids, image_ids = super().prepare_latents(image, *args, **kwargs)
        if self._start_from_source:  # one-step edit: the packed source tokens (B, T, C) are the start
            latents = image_latents.clone()
        return latents, image_latents, latent_ids, image_ids

    def _edit_size(self, image, height, width, max_area) -> tuple[int, int, int]:
        multiple = self.vae_scale_factor * 2
        if height is None or width is None:
            width, height = image.size if image is not None else (self.default_sample_size * self.vae_scale_factor,) * 2
        if max_area is None:
            max_area = min(height * width, 1024**2)
        scale = min(1.0, (max_area / (height * width)) ** 0.5)
        h, w = int(height * scale) // multiple * multiple, int(width * scale) // multiple * multiple
        if h == 0 or w == 0:
            raise ValueError(f"{width}x{height} is smaller than the model's {multiple}-pixel grid")
        return h, w, h * w

    @torch.no_grad()
    def __call__(self, image=None, prompt=None, task=None, height: int | None = None, width: int | None = None,
                 max_area: int | None = None, **kwargs):
        """Edit ``image`` following ``prompt`` (the instruction).

        Args:
            image: source image(s): PIL, path, uint8 array, or a list of them (one per prompt). None
                generates from text alone (as the base text-to-image model).
            prompt: instruction or list of instructions (non-empty, at most 2000 characters).
            task: a task name/id, one per prompt, or None to classify each instruction.
            height, width: output size; default: the source image's size.
            max_area: cap on height*width (default: min(source area, 1024^2)).
            **kwargs: everything ``FluxKontextPipeline.__call__`` takes (num_inference_steps,
                guidance_scale, generator, num_images_per_prompt, output_type, callback_on_step_end,
                latents, prompt_embeds, ...).
        """
        prompts = None
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            for p in prompts:
                if not isinstance(p, str) or not p.strip():
                    raise ValueError("the instruction is empty: say what to change, e.g. 'make the car red'")
                if len(p) > MAX_INSTRUCTION_CHARS:
                    raise ValueError(f"the instruction has {len(p)} characters; the limit is {MAX_INSTRUCTION_CHARS}")
        if image is not None and not (torch.is_tensor(image) and image.dim() == 4):
            if isinstance(image, (list, tuple)):
                image = [as_rgb_image(im, f"image {i}") for i, im in enumerate(image)]
            else:
                image = as_rgb_image(image)
            first = image[0] if isinstance(image, list) else image
            height, width, area = self._edit_size(first, height, width, max_area)
            resize = lambda im: im if im.size == (width, height) else im.resize((width, height))  # noqa: E731
            image = [resize(im) for im in image] if isinstance(image, list) else resize(image)
        else:
            height, width, area = self._edit_size(None, height, width, max_area)
        kwargs.setdefault("_auto_resize", False)
        start = self.source_start()
        if start is not None:
            if image is None:
                raise ValueError(f"this pipeline's adapter edits in one step from the source (source_start={start}): "
                                 "pass image=")
            if kwargs.get("num_inference_steps") not in (None, 1):
                raise ValueError(f"this pipeline's adapter edits in one step from the source (source_start={start}); "
                                 f"num_inference_steps={kwargs['num_inference_steps']} is not supported, leave it unset")
            for key in ("latents", "sigmas", "timesteps"):
                if kwargs.get(key) is not None:
                    raise ValueError(f"{key}= cannot be given to a one-step adapter: it starts from the source at "
                                     f"noise level {start}")
            mu, cfg = None, self.scheduler.config
            if cfg.get("use_dynamic_shifting"):  # the shift FluxKontextPipeline will apply at this size
                tokens = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
                mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            kwargs.update(num_inference_steps=1, sigmas=[unshifted_sigma(self.scheduler, start, mu)])
        elif kwargs.get("num_inference_steps") is None:
            kwargs["num_inference_steps"] = self.default_num_inference_steps

        routing = contextlib.nullcontext()
        if self._routes_by_task():
            if prompts is None:
                if task is None:
                    raise ValueError("pass task= when calling with prompt_embeds: there is no instruction to classify")
                n = kwargs["prompt_embeds"].shape[0] // (kwargs.get("num_images_per_prompt") or 1)
                prompts = [""] * n
            ids = self.resolve_tasks(prompts, task)
            per_prompt = kwargs.get("num_images_per_prompt") or 1
            task_ids = torch.tensor(ids, dtype=torch.long).repeat_interleave(per_prompt)
            routing = routing_context(self.transformer, task_ids=task_ids)
        elif task is not None:  # no router to feed, but an unknown task name is still an error
            for t in task if isinstance(task, (list, tuple)) else [task]:
                get_task(t)
        reading = contextlib.nullcontext()
        if residual_adapters(self.transformer):
            if prediction_type(self.scheduler) != "flow":
                raise ValueError("a residual-reading adapter needs a flow (velocity) base; this base's scheduler reads "
                                 f"its output as {prediction_type(self.scheduler)!r}")
            if image is None:
                raise ValueError("this pipeline's adapter edits a source image (residual reading): pass image=")
            reading = residual_reading(self.transformer)
        self._start_from_source = start is not None
        try:
            # LoRA hook: joint_attention_kwargs={"scale": s} scales the community LoRAs (pipeline_lora.py)
            # AutoLoRA hook: lora_index= / auto_lora_top_k= retrieve and load LoRAs, fuse_loras() gates them per
            # layer and step (pipeline_lora.py); entered first, so the routing and the reading see them
            with self._lora_fusion_call(prompts, kwargs), routing, reading, \
                    self._community_lora_scale(kwargs.get("joint_attention_kwargs")):
                return super().__call__(image=image, prompt=prompt, height=height, width=width, max_area=area,
                                        **kwargs)
        finally:
            self._start_from_source = False
