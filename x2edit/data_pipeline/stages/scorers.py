"""Scorers: each writes named numeric scores, or None with a note saying why.

- ``oracle_scorer``: agreement of the target with Shape World's exact target.
- ``pixel_scorer``: PSNR / SSIM outside the edited region, changed-area and mask ratios.
- ``clip_scorer``: CLIP image similarity and CLIP direction similarity (open_clip, local weights).
- ``vlm_judge``: a VLM judge in the VIEScore / GEdit-Bench form, on a transformers VLM by path.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from x2edit.data_pipeline import metrics
from x2edit.data_pipeline.stages.base import Stage, check_model_path, register_stage, resolve_device


class Scorer(Stage):
    role = "scorer"
    names: tuple[str, ...] = ()

    def score_names(self):
        return self.names


@register_stage("oracle_scorer")
class OracleScorer(Scorer):
    """How close the target is to Shape World's exact target for the same (seed, task, split).

    Scores: ``oracle_psnr`` (dB, capped at 100) and ``oracle_match`` (fraction of pixels whose
    largest channel error is at most ``tolerance``). Samples not from Shape World get None.
    """

    names = ("oracle_psnr", "oracle_match")

    @dataclasses.dataclass
    class Params:
        tolerance: int = 8

    @property
    def requires(self):
        return frozenset({"target"})

    def _exact(self, s) -> np.ndarray | None:
        if "exact_target" in s.extra:
            return s.extra["exact_target"]
        p = s.provenance
        if p.get("generator") != "shapeworld":
            return None
        from x2edit.data_pipeline.shapeworld import ShapeWorld

        worlds = self.__dict__.setdefault("_worlds", {})
        world = worlds.setdefault(p["resolution"], ShapeWorld(p["resolution"]))
        return world.generate(p["seed"], p["task"], p["split"]).target

    def process(self, batch):
        for s in batch:
            if not s.kept:
                continue
            exact = self._exact(s)
            if exact is None:
                for n in self.names:
                    s.set_score(n, None, "not a Shape World sample")
                continue
            if exact.shape != s.target.shape:
                for n in self.names:
                    s.set_score(n, None, f"target size {s.target.shape[:2]} differs from the exact {exact.shape[:2]}")
                continue
            s.set_score("oracle_psnr", metrics.psnr(s.target, exact))
            err = np.abs(s.target.astype(np.int16) - exact.astype(np.int16)).max(axis=-1)
            s.set_score("oracle_match", float((err <= self.params.tolerance).mean()))
        return batch


@register_stage("pixel_scorer")
class PixelScorer(Scorer):
    """Pixel metrics of the edit.

    Scores: ``psnr_outside`` / ``ssim_outside`` (source vs target outside the edited region; None
    when the region is the whole image), ``changed_ratio`` (fraction of pixels that changed by more
    than ``tolerance``), ``mask_ratio`` (fraction inside the region) and ``leak_ratio`` (fraction
    of pixels outside the region that changed). Without a mask the region is estimated from the
    difference itself (noted), so the outside scores then only measure low-amplitude drift.
    """

    names = ("psnr_outside", "ssim_outside", "changed_ratio", "mask_ratio", "leak_ratio")

    @dataclasses.dataclass
    class Params:
        tolerance: int = 10
        estimate_dilate: int = 2

    @property
    def requires(self):
        return frozenset({"source", "target"})

    def process(self, batch):
        for s in batch:
            if not s.kept:
                continue
            if s.source.shape != s.target.shape:
                for n in self.names:
                    s.set_score(n, None, f"source {s.source.shape[:2]} and target {s.target.shape[:2]} sizes differ")
                continue
            diff = metrics.changed(s.source, s.target, self.params.tolerance)
            s.set_score("changed_ratio", float(diff.mean()))
            mask = s.mask
            estimated = mask is None
            if estimated:
                mask = metrics.dilate(diff, self.params.estimate_dilate)
            outside = ~mask
            s.set_score("mask_ratio", float(mask.mean()))
            s.set_score("leak_ratio", float((diff & outside).mean()))
            whole = "the edited region is the whole image"
            psnr = metrics.psnr(s.source, s.target, outside)
            s.set_score("psnr_outside", psnr, whole)
            ssim = metrics.ssim(s.source, s.target, outside) if psnr is not None else None
            s.set_score("ssim_outside", ssim, whole)
            if estimated:
                s.provenance["mask_estimated"] = True
        return batch


# ---------------------------------------------------------------------------------------------


def clip_scores(src: np.ndarray, tgt: np.ndarray, cap_src: np.ndarray | None = None,
                cap_tgt: np.ndarray | None = None, instr: np.ndarray | None = None) -> dict[str, float | None]:
    """CLIP scores from embeddings (rows of one sample; any scale, normalised here).

    ``clip_image_sim``: cos(source, target). ``clip_direction``: cos(target - source, caption_target -
    caption_source), the InstructPix2Pix directional similarity. ``clip_text_target``: cos(target,
    caption_target) when captions exist, else cos(target, instruction).
    """
    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    out: dict[str, float | None] = {"clip_image_sim": float(unit(src) @ unit(tgt))}
    if cap_src is not None and cap_tgt is not None:
        d_img, d_txt = unit(tgt) - unit(src), unit(cap_tgt) - unit(cap_src)
        ok = np.linalg.norm(d_img) > 0 and np.linalg.norm(d_txt) > 0
        out["clip_direction"] = float(unit(d_img) @ unit(d_txt)) if ok else None
        out["clip_text_target"] = float(unit(tgt) @ unit(cap_tgt))
    else:
        out["clip_direction"] = None
        out["clip_text_target"] = float(unit(tgt) @ unit(instr)) if instr is not None else None
    return out


@register_stage("clip_scorer")
class ClipScorer(Scorer):
    """CLIP similarities through open_clip with local weights (``pip install x2edit[clip]``).

    Args (Params):
        model: open_clip architecture name, e.g. "ViT-B-32".
        pretrained: path to the weights file (nothing is downloaded).
    """

    names = ("clip_image_sim", "clip_direction", "clip_text_target")
    uses_model = True

    @dataclasses.dataclass
    class Params:
        pretrained: str
        model: str = "ViT-B-32"
        device: str = "auto"
        batch_size: int = 32

    @property
    def requires(self):
        return frozenset({"source", "target", "instruction"})

    def validate(self):
        try:
            import open_clip  # noqa: F401
        except ImportError:
            raise ValueError(f"{self.name} needs open_clip: pip install x2edit[clip]") from None
        if not os.path.isfile(os.path.expanduser(self.params.pretrained)):
            raise FileNotFoundError(f"{self.name}: CLIP weights file {self.params.pretrained!r} does not exist")

    def setup(self):
        import open_clip

        self.device = resolve_device(self.params.device)
        model, _, preprocess = open_clip.create_model_and_transforms(self.params.model,
                                                                     pretrained=self.params.pretrained)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(self.params.model)

    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        import torch
        from PIL import Image

        x = torch.stack([self.preprocess(Image.fromarray(im)) for im in images]).to(self.device)
        with torch.no_grad():
            return self.model.encode_image(x).float().cpu().numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu().numpy()

    def process(self, batch):
        if not hasattr(self, "model"):
            self.setup()
        live = [s for s in batch if s.kept]
        if not live:
            return batch
        src = self.encode_images([s.source for s in live])
        tgt = self.encode_images([s.target for s in live])
        instr = self.encode_texts([s.instruction for s in live])
        with_caps = [i for i, s in enumerate(live) if "captions" in s.extra]
        caps = {}
        if with_caps:
            # the pair's two scenes (a colour set's captions go on panel by panel: its first two are the pair's)
            emb = self.encode_texts([c for i in with_caps for c in live[i].extra["captions"][:2]])
            caps = {i: (emb[2 * j], emb[2 * j + 1]) for j, i in enumerate(with_caps)}
        for i, s in enumerate(live):
            cs, ct = caps.get(i, (None, None))
            for name, value in clip_scores(src[i], tgt[i], cs, ct, instr[i]).items():
                s.set_score(name, value, "no source/target captions" if name == "clip_direction" else "degenerate")
        return batch


# ---------------------------------------------------------------------------------------------

SC_PROMPT = (
    "You are a professional digital artist judging an image edit. The first image is the original, the "
    "second is the edited result. The editing instruction was: \"{instruction}\".\n"
    "Give two ratings from 0 to 10. First: how well the edited image follows the instruction (0 = not "
    "at all, 10 = perfectly). Second: how well everything the instruction did not ask to change was left "
    "alone (0 = it is a different picture, 10 = nothing else changed).\n"
    "Answer with JSON only, exactly in this form: {{\"score\": [first, second], \"reasoning\": \"one sentence\"}}"
)
PQ_PROMPT = (
    "You are a professional digital artist judging the quality of a generated image.\n"
    "Give two ratings from 0 to 10. First: how natural the image looks for its style (lighting, shapes, "
    "proportions; 10 = fully natural). Second: how free it is of artifacts such as distortion, blur, noise, "
    "smears or broken shapes (10 = none at all).\n"
    "Answer with JSON only, exactly in this form: {{\"score\": [first, second], \"reasoning\": \"one sentence\"}}"
)


def viescore(sc: list[float] | None, pq: list[float] | None) -> dict[str, float | None]:
    """VIEScore / GEdit aggregation: SC = min(success, no over-editing), PQ = min(naturalness,
    no artifacts), overall = sqrt(SC * PQ), all on 0..10."""
    out: dict[str, float | None] = dict.fromkeys(
        ("judge_success", "judge_overedit", "judge_naturalness", "judge_artifacts", "judge_sc", "judge_pq",
         "judge_overall"))
    if sc is not None:
        out["judge_success"], out["judge_overedit"] = sc
        out["judge_sc"] = min(sc)
    if pq is not None:
        out["judge_naturalness"], out["judge_artifacts"] = pq
        out["judge_pq"] = min(pq)
    if sc is not None and pq is not None:
        out["judge_overall"] = math.sqrt(min(sc) * min(pq))
    return out


@register_stage("vlm_judge")
class VlmJudge(Scorer):
    """VIEScore-style judge on a transformers VLM by path (e.g. Qwen2.5-VL / Qwen3-VL).

    Two questions per sample: semantic consistency (source + target + instruction) and perceptual
    quality (target). An answer that cannot be parsed gives None scores with the reason and the
    start of the answer in the notes; the run goes on.
    """

    names = ("judge_success", "judge_overedit", "judge_naturalness", "judge_artifacts", "judge_sc", "judge_pq",
             "judge_overall")
    uses_model = True

    @dataclasses.dataclass
    class Params:
        path: str
        max_new_tokens: int = 256
        device: str = "auto"
        dtype: str = "auto"
        batch_size: int = 1

    @property
    def requires(self):
        return frozenset({"source", "target", "instruction"})

    def validate(self):
        check_model_path(self.name, self.params.path)

    def setup(self):
        from x2edit.data_pipeline.chat import ChatModel

        self.model = ChatModel(self.params.path, vision=True, device=self.params.device, dtype=self.params.dtype)

    def ask(self, prompt: str, images: list[np.ndarray]) -> str:
        return self.model.generate(prompt, images, self.params.max_new_tokens)

    def _judge(self, source: np.ndarray, target: np.ndarray, instruction: str) -> tuple[dict, str | None, str | None]:
        """(``viescore`` of one edit, why the consistency answer could not be read, why the quality one could not)."""
        from x2edit.data_pipeline.chat import parse_scores

        if not hasattr(self, "model"):
            self.setup()
        sc, sc_why = parse_scores(self.ask(SC_PROMPT.format(instruction=instruction), [source, target]))
        pq, pq_why = parse_scores(self.ask(PQ_PROMPT, [target]))
        return viescore(sc, pq), sc_why, pq_why

    def score_edit(self, source, output, instruction: str) -> float | None:
        """VIEScore's overall score (0..10) of one edit, PIL images or uint8 arrays; None when an answer cannot
        be read. The judge of ``x2edit.best_of.best_of_n`` (``x2edit edit --best-of N --judge PATH``)."""
        rgb = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else im for im in (source, output)]
        return self._judge(*rgb, instruction)[0]["judge_overall"]

    def process(self, batch):
        for s in batch:
            if not s.kept:
                continue
            scores, sc_why, pq_why = self._judge(s.source, s.target, s.instruction)
            for name, value in scores.items():
                why = sc_why if name in ("judge_success", "judge_overedit", "judge_sc") else pq_why
                if name == "judge_overall":
                    why = "; ".join(w for w in (sc_why, pq_why) if w)
                s.set_score(name, value, f"unparseable judge answer: {why}")
        return batch
