"""What the editing app does, in plain Python: load a model, classify, edit, batch, search LoRAs.

Nothing here imports Gradio, so every handler is tested directly; ``x2edit.app.ui`` lays the page out and
turns the ``ValueError``s raised here into messages the user sees. One ``Editor`` holds one model on
one device and runs one edit at a time (its lock; the UI's queue also lets one edit run at once).

Files: every image the app reads comes from the app's own folders (``input_roots``: Gradio's upload
folder, the examples and the output folder); every image it writes is a PNG (lossless) in
``output_dir``. A path from anywhere else (e.g. sent through the API) is refused.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from x2edit.registry import EDIT_MODES, MODE_KINDS

BASE_OWN_ADAPTER = "the base's own"  # the adapter choice that keeps the base's shipped editing adapter
AUTO_TASK = "auto"  # the task choice that routes by the classifier
FUSION_CHOICES = ("gated", "sum", "average", "switch", "composite", "klora", "topk_select")  # the learned gate, then fuse_loras' names
SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
INDEX_HELP = ("No LoRA index was given. Build one from a folder of LoRA files with "
              "`x2edit lora index DIR --out loras.parquet`, then start the app with "
              "`x2edit app --lora-index loras.parquet`.")

Progress = Callable[..., None]  # progress(fraction in [0, 1], desc=str): gr.Progress has this form


def default_fusion() -> str:
    """The fusion the LoRA panel starts on: "gated" where a trained gate ships with the package, else
    "average" (training-free), so that a first edit with LoRAs works either way."""
    from x2edit.retrieval.fusion import default_gate_path

    try:
        default_gate_path()
    except FileNotFoundError:
        return "average"
    return "gated"


def parse_file_size(size: str | int) -> int:
    """Bytes of "20mb", "500kb", "1gb" or a plain number of bytes; ``ValueError`` otherwise."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?b)?\s*", str(size).lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"file size {size!r} is not a size: write e.g. 20mb, 500kb or a number of bytes")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2) or "b"])


@dataclass
class AppConfig:
    """What ``x2edit app`` serves (the CLI's options).

    Args:
        base: registered base name or local pipeline directory loaded at start (default: x2edit-tiny).
        adapter: an x2edit adapter file offered beside the base's own adapter.
        lora_index: an AutoLoRA index (``x2edit lora index``) the LoRA panel searches.
        host, port: where the server listens (port None: the first free one from 7860).
        max_file_size: uploads above it are refused before any handler runs.
        output_dir: where results, history and zips are written (None: a new temporary folder).
        device, dtype: as ``x2edit edit``'s.
        queue_size: edits waiting at most; one more is refused with "busy, try again".
        guidance: the guidance shown at start.
        lora_top_k: results of a LoRA search.
    """

    base: str | None = None
    adapter: str | None = None
    lora_index: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    max_file_size: str | int = "20mb"
    output_dir: str | None = None
    device: str | None = None
    dtype: str | None = None
    queue_size: int = 16
    guidance: float = 2.5
    lora_top_k: int = 5


@dataclass
class EditRecord:
    """One finished edit: what the history shows and reloads.

    Args:
        source: the source as read (PNG in the output folder); before: the source at the result's size.
        result: the edited image (PNG in the output folder).
        instruction, task: the instruction and the task it was routed to.
        task_choice: "auto" (the classifier chose ``task``) or the task the user forced.
        scores: {task: probability} of the classifier's three likeliest tasks when it chose (``classify``);
            empty when the task was forced.
        settings: base, adapter, steps, guidance, seed, loras [(file, weight)], fusion.
        seconds: wall time of the edit.
    """

    source: str
    before: str
    result: str
    instruction: str
    task: str
    task_choice: str
    scores: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def caption(self) -> str:
        return f"{self.task}: {self.instruction}"

    def to_dict(self) -> dict:
        return asdict(self)


def softmax_top(scores, k: int = 3) -> dict[str, float]:
    """{task: probability} of the k most likely tasks from one row of classifier scores."""
    import torch

    from x2edit.tasks import TASK_NAMES

    probs = torch.softmax(scores.float(), -1)
    top = torch.topk(probs, min(k, len(probs)))
    return {TASK_NAMES[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}


class Editor:
    """One model on one device, and the app's actions on it.

    Args:
        config: the app's settings.
        output_dir: where results go (created).
        input_roots: the only folders images may be read from, beside ``output_dir`` (e.g. Gradio's
            upload folder).
    """

    def __init__(self, config: AppConfig, output_dir: str | Path, input_roots: list[str | Path] = ()):
        self.config = config
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.input_roots = [self.output_dir, *(Path(r).resolve() for r in input_roots)]
        self._lock = threading.Lock()
        self._pipe = None
        self._loaded: tuple[str, str] | None = None  # (base, adapter choice) of self._pipe
        self._count, self._count_lock = 0, threading.Lock()  # numbers the files written
        self.index = None  # the LoRA index (x2edit.retrieval.LoraIndex), read once at start
        self.lora_files: set[str] = set()  # its usable files: the only LoRA files an edit may load
        if config.lora_index is not None:
            from x2edit.retrieval import LoraIndex

            self.index = LoraIndex(config.lora_index)
            self.lora_files = set(self.index.files())
        self._gate = None  # the learned gate, loaded on the first "gated" edit

    # -- models ------------------------------------------------------------------------------
    @property
    def default_base(self) -> str:
        from x2edit.registry import DEFAULT_BASE

        return self.config.base or DEFAULT_BASE

    def base_choices(self, mode: str | None = None) -> list[str]:
        """Registered bases that are installed and run ``mode`` (``MODE_KINDS``; None: any mode), and
        ``--base`` if a directory."""
        from x2edit.registry import BASE_MODELS

        kinds = MODE_KINDS[mode] if mode else {k for ks in MODE_KINDS.values() for k in ks}
        names = [m.name for m in BASE_MODELS.values() if m.mode in kinds and m.available]
        if self.default_base in names or (mode is not None and self.mode_of(self.default_base) not in MODE_KINDS[mode]):
            return names
        return [self.default_base, *names]

    @property
    def default_mode(self) -> str:
        """The editing mode the default base runs first: its own ("incontext" for a text-to-image base)."""
        kind = self.mode_of(self.default_base)
        return "incontext" if kind == "t2i" else kind

    def mode_choices(self) -> list[str]:
        """The editing modes some offered base runs: "edit" (Kontext layout), "diptych" (ICEdit on Fill) and
        "incontext" (IC-LoRA 2-panel sets)."""
        return [m for m in EDIT_MODES if self.base_choices(m)]

    @staticmethod
    def mode_of(base: str) -> str:
        """The kind of ``base``: "edit", "diptych" or "t2i" (``registry.pipeline_mode``)."""
        from x2edit.registry import pipeline_mode, resolve_base

        return pipeline_mode(*resolve_base(base))

    def adapter_choices(self) -> list[str]:
        return [BASE_OWN_ADAPTER, *([str(self.config.adapter)] if self.config.adapter else [])]

    def pipeline(self, base: str | None = None, adapter: str | None = None, progress: Progress | None = None):
        """The pipeline for (base, adapter), loading it in place of the current one if it differs.

        Only the offered choices load: a name or path the app was not started with is refused.
        """
        from x2edit.registry import load_edit_pipeline

        base, adapter = base or self.default_base, adapter or BASE_OWN_ADAPTER
        if base not in self.base_choices():
            raise ValueError(f"unknown base {base!r}: choose one of {', '.join(self.base_choices())}")
        if adapter not in self.adapter_choices():
            raise ValueError(f"unknown adapter {adapter!r}: start the app with --adapter FILE to offer it")
        if self._loaded != (base, adapter):
            if progress is not None:
                progress(0.0, desc=f"loading {base}")
            self._pipe = None  # one model in memory at a time
            pipe = load_edit_pipeline(base, None if adapter == BASE_OWN_ADAPTER else adapter, self.config.device,
                                      self.config.dtype, mode="incontext" if self.mode_of(base) == "t2i" else None)
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self._loaded = pipe, (base, adapter)
        return self._pipe

    def steps_setting(self, base: str | None = None, adapter: str | None = None) -> tuple[int, bool]:
        """(the step count the model edits with when none is given, whether it edits from the source): an
        adapter that edits from the source (x2edit-tiny's) takes one by default, and more steps on request
        (they help community LoRAs, not its own adapter: ``X2EditPipeline.__call__``)."""
        with self._lock:
            pipe = self.pipeline(base, adapter)
            one_step = pipe.source_start() is not None
            return (1 if one_step else int(pipe.default_num_inference_steps)), one_step

    # -- tasks -------------------------------------------------------------------------------
    def classify(self, instruction: str) -> dict[str, float]:
        """{task: probability} of the three tasks the current model's classifier finds likeliest.

        Probabilities are the softmax of the classifier's scores; a classifier without scores (an
        LLM) gives its one answer with probability 1.
        """
        if not isinstance(instruction, str) or not instruction.strip():
            return {}
        with self._lock:
            return self._classify(self._pipe if self._pipe is not None else self.pipeline(), instruction)

    @staticmethod
    def _classify(pipe, instruction: str) -> dict[str, float]:
        classifier = pipe.task_classifier
        if hasattr(classifier, "scores"):
            return softmax_top(classifier.scores([instruction])[0])
        return {classifier([instruction])[0]: 1.0}

    # -- files -------------------------------------------------------------------------------
    def check_input_path(self, path: str | Path) -> Path:
        """``path`` resolved, if it lies in one of the app's folders; ``ValueError`` otherwise."""
        if not path:
            raise ValueError("no image: upload one, or pick an example")
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.input_roots):
            raise ValueError("that file is not one the app can read: upload the image instead")
        return resolved

    def read_image(self, path: str | Path):
        """The image at ``path`` (an app folder), decoded and checked as ``x2edit edit`` does."""
        from x2edit.images import load_image

        resolved = self.check_input_path(path)
        try:
            return load_image(resolved)
        except ValueError as e:  # name the upload, not the app's temporary path
            raise ValueError(str(e).replace(str(resolved), resolved.name)) from None

    def _new_path(self, stem: str, suffix: str = ".png") -> Path:
        with self._count_lock:
            self._count += 1
            return self.output_dir / f"{self._count:04d}_{stem}{suffix}"

    # -- editing -----------------------------------------------------------------------------
    def edit(self, source: str | Path, instruction: str, task: str = AUTO_TASK, steps: int | None = None,
             guidance: float | None = None, seed: int | None = 0, base: str | None = None,
             adapter: str | None = None, loras: list[tuple[str, float]] = (), fusion: str = "gated",
             progress: Progress | None = None, mode: str | None = None, caption: str | None = None) -> EditRecord:
        """Edit one image and save the result.

        Args:
            source: the image file (in an app folder).
            instruction: what to change.
            task: "auto" (the classifier routes) or one of the 15 task names.
            steps: denoising steps (None: the model's own; x2edit-tiny edits in one step).
            guidance: guidance scale (None: the app's default).
            seed: the noise seed; None draws a random one (recorded in the settings).
            base, adapter: one of ``base_choices()`` / ``adapter_choices()`` (default: the app's).
            loras: [(LoRA file from the index, weight)] fused for this edit with ``fusion``.
            fusion: "gated" or a training-free fusion (``FUSION_CHOICES``).
            progress: called with (fraction, desc=...) while loading and after each denoising step.
            mode: "edit", "diptych" or "incontext" (None: the base's own): checked against the base.
            caption: incontext: the 2-panel set's joint caption ("[EDIT] ... [LEFT] ... [RIGHT] ...").
        """
        instruction, task, steps, guidance, seed, loras, fusion = self._check_settings(
            instruction, task, steps, guidance, seed, loras, fusion)
        mode, caption = self._check_mode(base, mode, caption, loras)
        image = self.read_image(source)
        with self._lock:
            return self._edit(image, instruction, task, steps, guidance, seed, base, adapter, loras, fusion,
                              progress, mode, caption)

    def edit_batch(self, sources: list[str | Path], instruction: str, task: str = AUTO_TASK,
                   steps: int | None = None, guidance: float | None = None, seed: int | None = 0,
                   base: str | None = None, adapter: str | None = None, loras: list[tuple[str, float]] = (),
                   fusion: str = "gated", progress: Progress | None = None, mode: str | None = None,
                   caption: str | None = None) -> tuple[list[EditRecord], Path]:
        """One instruction over several images (arguments as ``edit``): (records, zip of the results).

        Every image is read and checked before the first edit, so a bad file stops the batch early.
        """
        if not sources:
            raise ValueError("no images: upload one or more images for the batch")
        instruction, task, steps, guidance, seed, loras, fusion = self._check_settings(
            instruction, task, steps, guidance, seed, loras, fusion)
        mode, caption = self._check_mode(base, mode, caption, loras)
        images = [self.read_image(s) for s in sources]
        records = []
        with self._lock:
            for i, image in enumerate(images):
                def step(fraction, desc="", i=i):  # the whole batch's progress, image by image
                    if progress is not None:
                        progress((i + fraction) / len(images), desc=f"image {i + 1}/{len(images)}: {desc}")

                records.append(self._edit(image, instruction, task, steps, guidance, seed, base, adapter, loras,
                                          fusion, step, mode, caption))
        archive = self._new_path("batch", ".zip")
        with zipfile.ZipFile(archive, "w") as z:
            for i, (record, name) in enumerate(zip(records, sources)):
                z.write(record.result, f"{i + 1:03d}_{Path(name).stem}_edited.png")
        return records, archive

    def _check_settings(self, instruction, task, steps, guidance, seed, loras, fusion):
        """Everything checkable without the model, with messages that say what to do."""
        from x2edit.tasks import get_task

        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("the instruction is empty: say what to change, e.g. 'make the square red'")
        task = task or AUTO_TASK
        if task != AUTO_TASK:
            get_task(task)
        if steps is not None:
            if isinstance(steps, float) and not steps.is_integer() or int(steps) < 1:
                raise ValueError(f"steps must be a whole number >= 1, got {steps}")
            steps = int(steps)
        guidance = self.config.guidance if guidance is None else float(guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a number >= 0, got {guidance}")
        if seed is None:
            seed = secrets.randbelow(2**31)
        elif isinstance(seed, float) and not seed.is_integer() or not 0 <= int(seed) < 2**63:
            raise ValueError(f"the seed must be a whole number >= 0, got {seed}")
        if fusion not in FUSION_CHOICES:
            raise ValueError(f"unknown fusion {fusion!r}: choose one of {', '.join(FUSION_CHOICES)}")
        checked = []
        for file, weight in loras:
            if str(Path(file).resolve()) not in self.lora_files:
                raise ValueError(f"{Path(file).name} is not a LoRA of this app's index: pick LoRAs from the search "
                                 "results")
            if not math.isfinite(float(weight)):
                raise ValueError(f"the weight of {Path(file).name} must be a number, got {weight}")
            checked.append((str(Path(file).resolve()), float(weight)))
        return instruction.strip(), task, steps, guidance, int(seed), checked, fusion

    def _check_mode(self, base, mode, caption, loras) -> tuple[str, str | None]:
        """(the editing mode, the set's caption): the mode checked against the base, the caption against the mode."""
        from x2edit.incontext import check_caption
        from x2edit.registry import check_mode

        base = base or self.default_base
        kind = self.mode_of(base)
        mode = mode or ("incontext" if kind == "t2i" else kind)
        check_mode(base, mode)  # the registry's rule: which kinds of base the mode runs on
        if mode != "incontext":
            return mode, None
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError("the incontext mode needs the set's joint caption, e.g. "
                             "\"[EDIT] make it red [LEFT] a blue square [RIGHT] a red square\"")
        check_caption(caption.strip(), 2)
        if loras:
            raise ValueError("LoRAs from the index are for the edit and diptych modes: untick them for incontext")
        return mode, caption.strip()

    def _edit(self, image, instruction, task, steps, guidance, seed, base, adapter, loras, fusion, progress,
              mode="edit", caption=None):
        import torch

        t0 = time.perf_counter()
        pipe = self.pipeline(base, adapter, progress)
        scores = self._classify(pipe, instruction) if task == AUTO_TASK else {}
        routed = next(iter(scores)) if scores else task

        def on_step(pipe, i, t, tensors):
            if progress is not None:
                progress((i + 1) / pipe.num_timesteps, desc=f"step {i + 1}/{pipe.num_timesteps}")
            return {}

        if progress is not None:
            progress(0.0, desc="editing")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if mode == "incontext":  # the right panel of [source | ?] under the set's caption
            from x2edit.incontext import edit_as_set

            result = edit_as_set(pipe, image, caption, num_inference_steps=steps, task=routed, guidance_scale=guidance,
                                 generator=generator, callback_on_step_end=on_step)
        else:  # the picked LoRAs live for this edit only: the next edit starts from the bare model
            with pipe.with_loras([f for f, _ in loras], fusion=self._fusion(fusion), weights=[w for _, w in loras],
                                 prefix="app_lora"):
                result = pipe.edit(image, instruction, task=routed, num_inference_steps=steps, guidance_scale=guidance,
                                   generator=generator, callback_on_step_end=on_step).images[0]
        source_path = self._new_path("source")
        image.save(source_path)
        before_path = source_path
        if image.size != result.size:  # the model capped the size: compare like with like
            before_path = self._new_path("before")
            image.resize(result.size, resample=3).save(before_path)  # 3: bicubic
        result_path = self._new_path("result")
        result.save(result_path)
        base_name, adapter_name = self._loaded
        settings = {"base": base_name, "mode": mode, "caption": caption, "adapter": adapter_name, "steps": pipe.num_timesteps, "guidance": guidance,
                    "seed": seed, "loras": [[Path(f).name, w] for f, w in loras], "fusion": fusion if loras else None,
                    "size": list(result.size)}
        return EditRecord(str(source_path), str(before_path), str(result_path), instruction, routed, task, scores,
                          settings, round(time.perf_counter() - t0, 3))

    # -- LoRAs -------------------------------------------------------------------------------
    def _fusion(self, name: str):
        """What ``with_loras`` takes for a fusion choice: the learned gate object for "gated", else the name."""
        if name != "gated":
            return name
        if self._gate is None:
            from x2edit.retrieval import LearnedGate

            self._gate = LearnedGate()
        return self._gate

    def search_loras(self, query: str, k: int | None = None) -> list[dict]:
        """The index's LoRAs nearest to ``query``: ``LoraIndex.search``'s hits."""
        if self.index is None:
            raise ValueError(INDEX_HELP)
        return self.index.search(query, k=k or self.config.lora_top_k)
