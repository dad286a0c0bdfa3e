"""IC-LoRA image sets (In-Context LoRA, arXiv 2410.23775): panels tiled into one canvas under one caption.

A set of n panels, each (H, W), is one (H, n*W) image, left to right, described by one joint caption: a task
tag, a summary, then each panel's text after its position tag,

    "[EDIT] make the square red [LEFT] a blue square on a white background [RIGHT] a red square on ..."
    "[MOVIE-SHOTS] a chase at night [PANEL-1] ... [PANEL-2] ... [PANEL-3] ..."     (more than two panels)

A task LoRA trained on such canvases on a text-to-image base (``x2edit train`` mode ``incontext``) makes whole
sets from noise (``generate_set``). Given panels are kept and the others made either training-free
(``inpaint_set(method="sdedit")``: after every step the kept panels are put back at that step's noise level,
IC-LoRA's SDEdit-style inpainting on the text-to-image pipeline) or by a Fill model (``method="fill"``: the
panels to make are masked, as ``X2EditDiptychPipeline`` masks the right half of a diptych).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

_TAG = re.compile(r"^\s*\[([A-Z0-9][A-Z0-9_-]*)\]\s*\S")


def position_tags(n: int) -> list[str]:
    """The position tags of an n-panel set: [LEFT] [RIGHT] for two panels, [PANEL-1] ... otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"a panel set has at least 2 panels, got {n!r}")
    return ["[LEFT]", "[RIGHT]"] if n == 2 else [f"[PANEL-{i + 1}]" for i in range(n)]


def joint_caption(tag: str, summary: str, captions: list[str]) -> str:
    """"[TAG] summary [POS-1] caption 1 [POS-2] caption 2 ..." for one set (``tag`` upper case, no brackets)."""
    caption = f"[{tag.upper()}] {summary.strip()} " + " ".join(f"{p} {c.strip()}" for p, c in
                                                             zip(position_tags(len(captions)), captions))
    check_caption(caption, len(captions))
    return caption


def check_caption(caption: str, n: int) -> None:
    """A one-line ``ValueError`` unless ``caption`` opens with a task tag and carries the n position tags in order."""
    if not isinstance(caption, str) or not _TAG.match(caption):
        raise ValueError(f"an IC-LoRA caption opens with a task tag such as [EDIT] or [MOVIE-SHOTS], got {caption!r:.80}")
    at = 0
    for tag in position_tags(n):
        found = caption.find(tag, at)
        if found < 0:
            raise ValueError(f"the IC-LoRA caption of a {n}-panel set needs the position tags {' '.join(position_tags(n))} "
                             f"in order; {tag} is missing")
        at = found + len(tag)


def tile(panels: list) -> np.ndarray:
    """(H, n*W, 3) uint8 canvas of n panels (PIL images or (H, W, 3) uint8 arrays of one size), left to right."""
    arrays = [np.asarray(p.convert("RGB") if isinstance(p, Image.Image) else p) for p in panels]
    if len(arrays) < 2:
        raise ValueError(f"a panel set has at least 2 panels, got {len(arrays)}")
    for i, a in enumerate(arrays[1:], 1):
        if a.shape != arrays[0].shape:
            raise ValueError(f"panel {i} is {a.shape[1]}x{a.shape[0]}, panel 0 is {arrays[0].shape[1]}x{arrays[0].shape[0]}: "
                             "the panels of a set have one size")
    return np.concatenate(arrays, axis=1)


def split(canvas, n: int) -> list[Image.Image]:
    """The n panels of a canvas (PIL image or (H, n*W, 3) array), left to right."""
    a = np.asarray(canvas.convert("RGB") if isinstance(canvas, Image.Image) else canvas)
    if a.shape[1] % n:
        raise ValueError(f"a canvas {a.shape[1]} pixels wide does not split into {n} panels")
    w = a.shape[1] // n
    return [Image.fromarray(a[:, i * w:(i + 1) * w]) for i in range(n)]


def _panel_size(pipe, size: tuple[int, int]) -> tuple[int, int]:
    grid = pipe.vae_scale_factor * 2
    h, w = size
    if h % grid or w % grid:
        raise ValueError(f"panels of {w}x{h} do not sit on the model's {grid}-pixel grid: give sides that are "
                         f"multiples of {grid}")
    return h, w


@torch.no_grad()
def generate_set(pipe, caption: str, n_panels: int, panel_size: tuple[int, int], **call_kwargs) -> list[Image.Image]:
    """A whole set from noise with a text-to-image pipeline (``X2EditPipeline`` with no image) and its task LoRA:
    one (H, n*W) image for the joint caption, split into its n panels. ``panel_size`` is (H, W)."""
    check_caption(caption, n_panels)
    h, w = _panel_size(pipe, panel_size)
    out = pipe(prompt=caption, height=h, width=n_panels * w, max_area=h * n_panels * w, output_type="pil",
               **call_kwargs).images[0]  # max_area: the whole canvas, whatever the model's working area
    return split(out, n_panels)


@torch.no_grad()
def inpaint_set(pipe, panels: list, caption: str, method: str = "sdedit", generator=None,
                **call_kwargs) -> list[Image.Image]:
    """The set with its missing panels (None) made and the given ones kept, pixel for pixel.

    method "sdedit": training-free, on a text-to-image pipeline (``X2EditPipeline``): the loop runs from noise
        on the whole canvas and after every step the given panels' tokens are replaced by their clean latents
        noised to the step's level with one fixed noise draw (x_s = (1 - s) z + s e).
    method "fill": a Fill pipeline (``X2EditDiptychPipeline`` / ``FluxFillPipeline``) repaints the masked panels;
        a Fill base trained to edit in one step from the source (x2edit-tiny-fill) starts each panel to make from
        a copy of the nearest given panel, as its diptych edit starts from [source | source].
    """
    n = len(panels)
    check_caption(caption, n)
    given = [i for i, p in enumerate(panels) if p is not None]
    if not given or len(given) == n:
        raise ValueError(f"inpaint_set needs some panels given and some to make (None); got {len(given)} of {n} given")
    first = np.asarray(panels[given[0]].convert("RGB") if isinstance(panels[given[0]], Image.Image) else panels[given[0]])
    h, w = _panel_size(pipe, first.shape[:2])
    canvas = tile([p if p is not None else np.zeros_like(first) for p in panels])  # (h, n*w, 3)
    keep = np.zeros((h, n * w), dtype=bool)
    for i in given:
        keep[:, i * w:(i + 1) * w] = True
    pixels = torch.from_numpy(canvas).permute(2, 0, 1)[None].float() / 255  # (1, 3, h, n*w) in [0, 1]
    if method == "fill":
        if not hasattr(pipe, "mask_processor"):
            raise ValueError(f"method 'fill' needs a Fill pipeline (X2EditDiptychPipeline), not {type(pipe).__name__}")
        mask = torch.from_numpy(~keep)[None, None].float()
        start = pipe.source_start() if hasattr(pipe, "source_start") else None
        if start is not None:  # a base trained to edit in one step from the source: the panels to make start as
            near = [min(given, key=lambda g: abs(g - i)) for i in range(n)]  # copies of the nearest given panel
            begin = torch.from_numpy(tile([canvas[:, j * w:(j + 1) * w] for j in near])).permute(2, 0, 1)[None] / 255
            call_kwargs = {**call_kwargs, "latents": pipe._pack_pixels(begin.float() * 2 - 1), "num_inference_steps": 1,
                           "sigmas": pipe._source_start_sigmas(start, h, n * w)}
        out = pipe(prompt=caption, image=pixels, mask_image=mask, height=h, width=n * w, generator=generator,
                   output_type="np", **call_kwargs).images[0]
    elif method == "sdedit":
        if hasattr(pipe, "mask_processor"):
            raise ValueError("method 'sdedit' runs on a text-to-image pipeline (X2EditPipeline); use method 'fill' "
                             "with a Fill pipeline")
        out = _sdedit(pipe, pixels, keep, caption, generator, call_kwargs)
    else:
        raise ValueError(f"unknown method {method!r}: expected 'sdedit' or 'fill'")
    result = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    result[keep] = canvas[keep]  # the given panels come back exactly
    return split(result, n)


def edit_as_set(pipe, image, caption: str, max_area: int | None = None, num_inference_steps: int | None = None,
                **call_kwargs) -> Image.Image:
    """The right panel of the 2-panel set [image | ?] under the set's ``caption``: by Fill on a Fill pipeline,
    SDEdit-style on a text-to-image one (``inpaint_set``). ``image`` (PIL) is scaled down to ``max_area`` pixels
    (None: the pipeline's working area) on the model's grid; the panel comes back at that size.

    num_inference_steps: None: the pipeline's own; a base that edits in one step from the source takes one."""
    from x2edit.pipeline_common import _fit

    check_caption(caption, 2)
    one_step = pipe.source_start() is not None
    if one_step and num_inference_steps not in (None, 1):
        raise ValueError(f"this base makes the panel in one step from the given one: num_inference_steps must be 1 "
                         f"or None, got {num_inference_steps}")
    image = image.convert("RGB")
    h, w = _fit(image.size[1], image.size[0], max_area or pipe.default_max_area, pipe.vae_scale_factor * 2,
                "the source image")
    steps = {} if one_step else {"num_inference_steps": num_inference_steps or pipe.default_num_inference_steps}
    method = "fill" if pipe.editing_mode == "diptych" else "sdedit"
    return inpaint_set(pipe, [image.resize((w, h), Image.BICUBIC), None], caption, method=method, **steps,
                       **call_kwargs)[1]


def _sdedit(pipe, pixels: torch.Tensor, keep: np.ndarray, caption: str, generator, call_kwargs: dict) -> np.ndarray:
    """(h, n*w, 3) float output of the training-free inpainting loop (see ``inpaint_set``)."""
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    clean = pipe._pack_pixels(pixels * 2 - 1)  # (1, T, 4C)
    patch = pipe.vae_scale_factor * 2  # pixels per token side
    kept = torch.from_numpy(keep[::patch, ::patch].copy()).flatten().to(device)  # (T,) tokens of given panels
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    call_kwargs = dict(call_kwargs)
    user = call_kwargs.pop("callback_on_step_end", None)  # the caller's callback runs after the put-back
    inputs = list(dict.fromkeys(["latents", *call_kwargs.pop("callback_on_step_end_tensor_inputs", [])]))

    def put_back(p, i, t, tensors):
        latents = tensors["latents"]
        s = p.scheduler.sigmas[i + 1].to(device=device, dtype=dtype)  # the level this step has reached
        latents[:, kept] = ((1 - s) * clean + s * noise)[:, kept]
        return {"latents": latents, **((user(p, i, t, {**tensors, "latents": latents}) or {}) if user else {})}

    # The loop starts from the same noise on the given panels (sigma 1: x = e there), so they start consistent.
    height, width = keep.shape
    return pipe(prompt=caption, height=height, width=width, max_area=height * width, latents=noise.clone(),
                callback_on_step_end=put_back,
                callback_on_step_end_tensor_inputs=inputs, output_type="np", **call_kwargs).images[0]
