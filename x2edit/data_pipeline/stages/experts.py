"""Experts: stages that make the edited image.

- ``shapeworld_expert``: Shape World's exact edit for (seed, task): source, target and mask.
- ``diffusers_edit``: an instruction editing pipeline loaded by path (FLUX.1 Kontext by default).
- ``diffusers_inpaint``: an inpainting pipeline loaded by path (FLUX.1 Fill by default) that
  repaints the sample's mask, e.g. to delete an object.

Model experts load with ``from_pretrained(path)`` on the worker (``setup``), never download, and
seed their generator per sample key so reruns reproduce the same output.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
from PIL import Image

from x2edit.data_pipeline.sample import Sample
from x2edit.data_pipeline.stages.base import (
    Stage,
    check_model_path,
    register_stage,
    resolve_device,
    resolve_dtype,
)
from x2edit.tasks import TASK_NAMES, get_task

# Tasks whose change is confined to a region (what an inpainting expert can do).
LOCAL_TASKS = ("subject_deletion", "subject_addition", "color_change", "material_change", "action_change",
               "subject_replacement", "portrait_retouch", "text_change", "implicit_change")


class Expert(Stage):
    role = "expert"

    def supported_tasks(self) -> tuple[str, ...]:
        tasks = getattr(self.params, "tasks", None)
        return tuple(get_task(t).name for t in tasks) if tasks else TASK_NAMES

    def validate(self):
        for t in getattr(self.params, "tasks", None) or ():
            try:
                get_task(t)
            except ValueError as e:
                raise ValueError(f"{self.name}.tasks: {e}") from None

    def _skip(self, s: Sample) -> bool:
        """Dropped samples and tasks this expert does not do pass through."""
        if not s.kept:
            return True
        if s.task not in self.supported_tasks():
            s.drop(self.name, "task not supported by expert", str(s.task))
            return True
        return False


@register_stage("shapeworld_expert")
class ShapeWorldExpert(Expert):
    """Exact Shape World edits (needs a seed from ``shapeworld_source`` and a task).

    ``panels: n`` (3..6) makes IC-LoRA panel sets instead: one object in n colours (``ShapeWorld.panel_set``).
    Each is still an edit pair (panels 0 and 1, a colour change, with its instruction); the further panels and
    the set's joint caption are written beside it (``x2edit.data_pipeline.shards``). Colour changes only.
    """

    @dataclasses.dataclass
    class Params:
        resolution: int = 64
        supersample: int | None = None
        panels: int = 2

    @property
    def requires(self):
        return frozenset({"seed", "task"})

    @property
    def provides(self):
        return frozenset({"source", "target", "mask", "edit", "captions"})

    def supported_tasks(self) -> tuple[str, ...]:
        return ("color_change",) if self.params.panels > 2 else TASK_NAMES

    def validate(self):
        from x2edit.data_pipeline.shapeworld.world import MAX_PANELS

        if not 16 <= self.params.resolution <= 2048:
            raise ValueError(f"{self.name}: resolution must be in 16..2048, got {self.params.resolution}")
        if isinstance(self.params.panels, bool) or not isinstance(self.params.panels, int) or \
                not 2 <= self.params.panels <= MAX_PANELS:
            raise ValueError(f"{self.name}: panels must be 2 (edit pairs) to {MAX_PANELS} (colour sets), got "
                             f"{self.params.panels!r}")

    def setup(self):
        from x2edit.data_pipeline.shapeworld import ShapeWorld

        self.world = ShapeWorld(self.params.resolution, self.params.supersample)

    def process(self, batch):
        if not hasattr(self, "world"):
            self.setup()
        for s in batch:
            if self._skip(s):
                continue
            split = s.provenance.get("split", "train")
            if self.params.panels > 2:  # a colour set; panels 0 and 1 are its colour-change pair
                colors = self.world.panel_set(s.seed, self.params.panels, split)
                pair = colors.pair
                s.extra["panels"], s.extra["set_caption"] = colors.panels[2:], colors.caption
            else:
                pair = self.world.generate(s.seed, s.task, split)
            s.source, s.target, s.mask = pair.source, pair.target, pair.mask
            s.extra["pair"] = pair
            s.extra["exact_target"] = pair.target
            s.extra["captions"] = colors.captions if self.params.panels > 2 else pair.captions
            s.provenance.update(pair.provenance)
            s.provenance["expert"] = self.name
        return batch


def _seed_for(key: str, seed: int) -> int:
    return (zlib.crc32(key.encode()) + 1_000_003 * seed) % (2**31)


def _to_uint8(img) -> np.ndarray:
    return np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)


class _DiffusersExpert(Expert):
    uses_model = True

    def validate(self):
        super().validate()
        check_model_path(self.name, self.params.path)
        import diffusers

        if self.params.pipeline_class != "auto" and not hasattr(diffusers, self.params.pipeline_class):
            raise ValueError(f"{self.name}: diffusers has no pipeline class {self.params.pipeline_class!r}")

    def _load(self, auto_cls: str):
        import diffusers

        self.device = resolve_device(self.params.device)
        dtype = resolve_dtype(self.params.dtype, self.device)
        cls = getattr(diffusers, auto_cls if self.params.pipeline_class == "auto" else self.params.pipeline_class)
        # Newer diffusers name the argument dtype (torch_dtype is deprecated there).
        from diffusers.utils import deprecation_utils

        kw = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        pipe = cls.from_pretrained(self.params.path, **{kw: dtype})
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    def _generator(self, s: Sample):
        import torch

        return torch.Generator(device="cpu").manual_seed(_seed_for(s.key, self.params.seed))

    def _finish(self, s: Sample, out) -> None:
        img = out.images[0]
        target = _to_uint8(img)
        h, w = s.source.shape[:2]
        if target.shape[:2] != (h, w):
            # Pipelines may snap to their preferred sizes; scores compare at the source's size.
            target = np.asarray(Image.fromarray(target).resize((w, h), Image.LANCZOS))
            s.provenance["target_resized"] = True
        s.target = target
        s.provenance.update({"expert": self.name, "model": self.params.path,
                             "expert_seed": _seed_for(s.key, self.params.seed)})


@register_stage("diffusers_edit")
class DiffusersEdit(_DiffusersExpert):
    """Instruction editing with a diffusers pipeline loaded by path.

    Args (Params):
        path: local pipeline directory (``save_pretrained`` layout), e.g. FLUX.1-Kontext-dev.
        pipeline_class: diffusers class name, or "auto" for ``DiffusionPipeline``.
        prompt_template: the prompt; ``{instruction}`` is replaced.
        tasks: tasks this expert handles (default: all).
        auto_resize: let FLUX.1 Kontext resize the reference image to its preferred resolutions
            (~1 MP, as it was trained); turn off for small images or tiny test models.
        max_area: output pixel area for Kontext-style pipelines (which rescale to it); None keeps
            the source's area, so target and source align.
    """

    @dataclasses.dataclass
    class Params:
        path: str
        pipeline_class: str = "FluxKontextPipeline"
        prompt_template: str = "{instruction}"
        num_inference_steps: int = 28
        guidance_scale: float = 2.5
        auto_resize: bool = True
        max_area: int | None = None
        tasks: list[str] | None = None
        seed: int = 0
        device: str = "auto"
        dtype: str = "auto"
        batch_size: int = 1

    @property
    def requires(self):
        return frozenset({"source", "instruction", "task"})

    @property
    def provides(self):
        return frozenset({"target"})

    def setup(self):
        import inspect

        self._load("DiffusionPipeline")
        # Only Kontext-style pipelines take these (they rescale the output to max_area).
        self._kontext = "max_area" in inspect.signature(self.pipe.__call__).parameters

    def process(self, batch):
        if not hasattr(self, "pipe"):
            self.setup()
        for s in batch:
            if self._skip(s):
                continue
            h, w = s.source.shape[:2]
            extra = {"max_area": self.params.max_area or h * w, "_auto_resize": self.params.auto_resize} \
                if self._kontext else {}
            out = self.pipe(image=Image.fromarray(s.source), prompt=self.params.prompt_template.format(
                instruction=s.instruction), height=h, width=w, num_inference_steps=self.params.num_inference_steps,
                guidance_scale=self.params.guidance_scale, generator=self._generator(s), **extra)
            self._finish(s, out)
        return batch


@register_stage("diffusers_inpaint")
class DiffusersInpaint(_DiffusersExpert):
    """Inpaint the sample's mask with a diffusers pipeline loaded by path (FLUX.1 Fill by default).

    Args (Params):
        prompt: fixed prompt (e.g. "empty background" for deletion); None uses the instruction
            through ``prompt_template``.
        dilate: grow the mask by this many pixels first (covers antialiased edges and shadows).
        paste_back: keep the source's pixels outside the mask exactly.
    """

    @dataclasses.dataclass
    class Params:
        path: str
        pipeline_class: str = "FluxFillPipeline"
        prompt: str | None = None
        prompt_template: str = "{instruction}"
        num_inference_steps: int = 28
        guidance_scale: float = 30.0
        dilate: int = 2
        paste_back: bool = True
        tasks: list[str] | None = dataclasses.field(default_factory=lambda: list(LOCAL_TASKS))
        seed: int = 0
        device: str = "auto"
        dtype: str = "auto"
        batch_size: int = 1

    @property
    def requires(self):
        need = {"source", "mask", "task"}
        return frozenset(need if self.params.prompt is not None else need | {"instruction"})

    @property
    def provides(self):
        return frozenset({"target"})

    def setup(self):
        self._load("AutoPipelineForInpainting")

    def process(self, batch):
        if not hasattr(self, "pipe"):
            self.setup()
        for s in batch:
            if self._skip(s):
                continue
            if s.mask is None or not s.mask.any():
                s.drop(self.name, "no mask to inpaint")
                continue
            mask = s.mask
            if self.params.dilate > 0:
                from PIL import ImageFilter

                m = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * self.params.dilate + 1))
                mask = np.asarray(m) > 0
            prompt = self.params.prompt if self.params.prompt is not None else self.params.prompt_template.format(
                instruction=s.instruction)
            h, w = s.source.shape[:2]
            out = self.pipe(image=Image.fromarray(s.source), mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
                            prompt=prompt, height=h, width=w, num_inference_steps=self.params.num_inference_steps,
                            guidance_scale=self.params.guidance_scale, generator=self._generator(s))
            self._finish(s, out)
            if self.params.paste_back:
                s.target = np.where(mask[..., None], s.target, s.source)
            s.mask = mask
        return batch
