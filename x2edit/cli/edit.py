"""`x2edit edit`: edit one image from an instruction and write the result."""

from __future__ import annotations

import os
import time
from pathlib import Path

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_arguments(parser) -> None:
    parser.add_argument("--image", required=True, help="source image file")
    parser.add_argument("--instruction", required=True, help='what to change, e.g. "make the car red"')
    parser.add_argument("--out", required=True, help="output image file (.png, .jpg, .webp)")
    parser.add_argument("--mode", default=None, choices=["edit", "diptych", "incontext"],
                        help="edit: the source as Kontext reference tokens (X2EditPipeline); diptych: ICEdit's "
                             "in-context edit, a Fill model repaints the right half of [source | edit] "
                             "(X2EditDiptychPipeline); incontext: the right panel of an IC-LoRA set [source | ?] made "
                             "under --caption (by Fill on a Fill base, the default x2edit-tiny-fill; SDEdit-style on a "
                             "text-to-image base with its task LoRA, e.g. x2edit-tiny-t2i). Default: the base's own")
    parser.add_argument("--caption", default=None,
                        help='incontext: the set\'s joint caption, e.g. "[EDIT] make it red [LEFT] a blue square '
                             '[RIGHT] a red square"')
    parser.add_argument("--base", default=None, help="registered base model name or local pipeline directory "
                                                       "(default: x2edit-tiny; --mode diptych / incontext: "
                                                       "x2edit-tiny-fill)")
    parser.add_argument("--adapter", default=None, help="x2edit adapter file (.safetensors) to load")
    parser.add_argument("--lora", action="append", default=[],
                        help="community LoRA file (.safetensors: kohya, XLabs or diffusers keys) to add (repeatable)")
    parser.add_argument("--fusion", default=None, choices=["gated", "sum", "average", "switch", "composite", "klora", "topk_select"],
                        help="how the --lora / --auto-lora LoRAs combine, per layer and step (default: a plain sum; "
                             "--auto-lora: gated). klora is K-LoRA: exactly two LoRAs, the subject's first, the style's "
                             "second; switch changes LoRA every 5 steps; topk_select keeps per layer the LoRA of the "
                             "largest update")
    parser.add_argument("--auto-lora", default=None, metavar="INDEX",
                        help="retrieve LoRAs for the instruction from this index (x2edit lora index) and fuse them")
    parser.add_argument("--auto-lora-top-k", type=int, default=3, help="LoRAs --auto-lora retrieves")
    parser.add_argument("--auto-lora-min-score", type=float, default=None,
                        help="the score a retrieved LoRA needs to be fused (default 0.15; see AUTO_LORA_MIN_SCORE)")
    parser.add_argument("--task", default=None, help="task name (default: classified from the instruction)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: the model's own: 28 for FLUX; x2edit-tiny edits in one step from "
                             "the source, and more steps help community LoRAs there)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="distilled guidance scale (default: 2.5; diptych: the model's own, 50 for FLUX.1 Fill)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--best-of", type=int, default=1, metavar="N",
                        help="edit with N seeds (--seed, --seed+1, ...) and keep the one --judge scores best "
                             "(models sampled from noise only; costs N edits + N judge calls)")
    parser.add_argument("--judge", default=None, metavar="PATH",
                        help="the VLM judge of --best-of: a local transformers VLM (e.g. Qwen2.5-VL), scored as "
                             "VIEScore's overall (x2edit.data_pipeline.stages.scorers.VlmJudge)")
    parser.add_argument("--max-area", type=int, default=None,
                        help="cap on the output's pixel area (default: the model's own: 1024x1024 for FLUX, "
                             "64x64 for x2edit-tiny); larger images are scaled down, keeping their aspect ratio")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")


def check_lora_file(path: str) -> None:
    """A ``--lora`` file: readable safetensors, and not an x2edit adapter (those go to ``--adapter``)."""
    from safetensors import safe_open

    from x2edit.adapters.io import FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for other files)
        raise ValueError(f"--lora {path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                         "community LoRAs are loaded from .safetensors files") from None
    if meta.get("format") == FORMAT:
        raise ValueError(f"--lora {path} is an x2edit adapter: pass it with --adapter")


def run(args) -> int:
    import torch

    from x2edit.adapters import read_adapter_header
    from x2edit.files import atomic_path
    from x2edit.images import load_image
    from x2edit.registry import check_mode, load_edit_pipeline, resolve_device
    from x2edit.tasks import get_task

    # Validate everything cheap before loading any model.
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out must end in one of {', '.join(OUTPUT_SUFFIXES)}, got {out.name!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"output directory is not writable: {out.parent}")
    image = load_image(args.image)
    if not args.instruction.strip():
        raise ValueError("the instruction is empty: say what to change, e.g. 'make the car red'")
    if args.task is not None:
        get_task(args.task)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.max_area is not None and args.max_area < 1:
        raise ValueError(f"--max-area must be >= 1, got {args.max_area}")
    if args.fusion == "klora" and (len(args.lora) if args.lora else args.auto_lora_top_k) != 2:
        raise ValueError("--fusion klora (K-LoRA) fuses exactly two LoRAs, the subject's then the style's: give two "
                         "--lora files (or --auto-lora-top-k 2); topk_select takes any number")
    index = None
    if args.auto_lora is not None:
        from x2edit.retrieval import LoraIndex

        index = LoraIndex(args.auto_lora)  # read and checked before any model loads
    if args.fusion and not (args.lora or args.auto_lora):
        raise ValueError("--fusion combines LoRAs: give --lora FILE (repeatable) or --auto-lora INDEX")
    if args.adapter:
        read_adapter_header(args.adapter)  # exists, format and config, before loading any model
    for f in args.lora:
        if not Path(f).is_file():
            raise FileNotFoundError(f"LoRA file not found: {f}")
        check_lora_file(f)
    device = resolve_device(args.device)
    incontext = args.mode == "incontext"
    if incontext:
        from x2edit.incontext import check_caption

        if args.caption is None:
            raise ValueError("--mode incontext needs the set's joint caption: --caption \"[EDIT] ... [LEFT] ... [RIGHT] ...\"")
        check_caption(args.caption, 2)
        if args.best_of > 1:
            raise ValueError("--best-of is for the edit and diptych modes")
    elif args.caption is not None:
        raise ValueError("--caption is the joint caption of --mode incontext")
    base = check_mode(args.base, args.mode)  # a base of the mode asked for, before loading it
    judge = None
    if args.best_of < 1:
        raise ValueError(f"--best-of must be >= 1, got {args.best_of}")
    if args.best_of > 1:
        if args.judge is None:
            raise ValueError("--best-of N needs a judge to pick with: --judge PATH (a local VLM)")
        from x2edit.data_pipeline.stages.scorers import VlmJudge

        judge = VlmJudge(VlmJudge.Params(path=args.judge))
        judge.validate()  # the path holds a model, before anything loads
    elif args.judge is not None:
        raise ValueError("--judge picks among --best-of N outputs: give --best-of N (N >= 2)")

    t0 = time.perf_counter()
    pipe = load_edit_pipeline(base, args.adapter, device, args.dtype, mode=args.mode)
    diptych = pipe.editing_mode == "diptych"
    for i, f in enumerate(args.lora):
        pipe.load_lora_weights(f, adapter_name=f"lora_{i}")
    fusion = args.fusion
    if fusion == "gated" or (fusion is None and index is not None):
        from x2edit.retrieval import LearnedGate

        fusion = LearnedGate()  # the gate and weight encoder shipped for x2edit-tiny
    if args.fusion and args.lora:
        pipe.fuse_loras([f"lora_{i}" for i in range(len(args.lora))], fusion=fusion)
    auto = {"lora_index": index, "auto_lora_top_k": args.auto_lora_top_k, "auto_lora_fusion": fusion,
            "auto_lora_min_score": args.auto_lora_min_score} if index is not None else {}
    task = args.task
    if task is None and pipe._routes_by_task():
        task = pipe.task_classifier([args.instruction])[0]
    guidance = args.guidance if args.guidance is not None or diptych else 2.5
    kwargs = dict(task=task, num_inference_steps=args.steps, guidance_scale=guidance, max_area=args.max_area, **auto)
    if incontext:
        from x2edit.incontext import edit_as_set

        result = edit_as_set(pipe, image, args.caption, max_area=args.max_area, num_inference_steps=args.steps,
                             task=task, guidance_scale=guidance, generator=torch.Generator(device="cpu").manual_seed(args.seed))
    elif judge is not None:
        from x2edit.best_of import best_of_n

        best = best_of_n(pipe, image, args.instruction, args.best_of, judge.score_edit, seed=args.seed, **kwargs)
        result = best.image
        print(f"best of {args.best_of}: seed {best.seeds[best.chosen]} (judge scores "
              f"{', '.join('-' if s is None else f'{s:.2f}' for s in best.scores)}); {best.edit_seconds:.1f} s "
              f"editing, {best.judge_seconds:.1f} s judging")
    else:
        result = pipe.edit(image, args.instruction, generator=torch.Generator(device="cpu").manual_seed(args.seed),
                           **kwargs).images[0]
    with atomic_path(out) as tmp:  # an interrupted run leaves no partial output file
        result.save(tmp)
    how = "incontext, " if incontext else "diptych, " if diptych else ""
    print(f"wrote {out} ({result.size[0]}x{result.size[1]}, {how}task={task or '-'}, "
          f"{time.perf_counter() - t0:.1f} s)")
    for hit in pipe.retrieved_loras or []:
        print(f"  retrieved {hit['file']} (score {hit['score']:.3f})"
              + ("" if hit.get("used", True) else f": not used, {hit['reason']}"))
    return 0
