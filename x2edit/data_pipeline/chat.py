"""Chat models loaded by path (transformers), and parsing of their answers.

``ChatModel`` wraps an LLM (``AutoModelForCausalLM``) or a VLM (``AutoModelForImageTextToText``,
e.g. Qwen2.5-VL / Qwen3-VL) with its tokenizer or processor, formats messages with the model's own
chat template, and generates greedily. The parsers turn free-form answers into numbers or an
instruction, and say why when they cannot: an unusable answer is data, not a crash.
"""

from __future__ import annotations

import json
import re

import numpy as np

from x2edit.data_pipeline.stages.base import resolve_device, resolve_dtype

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)


class ChatModel:
    """A chat model from a local directory.

    Args:
        path: model directory (``save_pretrained`` layout with a chat template).
        vision: load a VLM with its processor (images allowed in messages).
        device, dtype: "auto" picks CUDA + bfloat16 when available, else CPU + float32.
    """

    def __init__(self, path: str, vision: bool, device: str = "auto", dtype: str = "auto"):
        import transformers

        self.vision = vision
        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, self.device)
        # transformers 5 names the argument dtype; 4.x names it torch_dtype.
        kw = {"dtype": torch_dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch_dtype}
        if vision:
            self.processor = transformers.AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(path, **kw)
        else:
            self.processor = None
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
        self.model.to(self.device).eval()

    def generate(self, prompt: str, images: list[np.ndarray] = (), max_new_tokens: int = 128) -> str:
        """The model's answer to one user turn holding ``images`` (VLM only) then ``prompt``."""
        import torch
        from PIL import Image

        if images and not self.vision:
            raise ValueError("this chat model was loaded without vision; it cannot take images")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content if self.vision else prompt}]
        templ = self.processor if self.vision else self.tokenizer
        text = templ.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.vision:
            pil = [Image.fromarray(im) for im in images]
            inputs = self.processor(text=[text], images=pil or None, return_tensors="pt")
        else:
            inputs = self.tokenizer([text], return_tensors="pt")
        inputs = inputs.to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True)


def _strip(text: str) -> str:
    return _FENCE.sub("", _THINK.sub("", text or "")).strip()


def parse_scores(text: str, n: int = 2, low: float = 0.0, high: float = 10.0) -> tuple[list[float] | None, str | None]:
    """Scores from a judge's answer, VIEScore style: ``{"score": [a, b], "reasoning": "..."}``.

    Also accepted: the list given as a string (``"score": "[7, 8]"``), a JSON object among other
    text or code fences, and a bare ``score: [7, 8]``. Returns (scores, None) or (None, reason).
    """
    body = _strip(text)
    if not body:
        return None, "empty answer"
    value = None
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", body):
        try:
            obj, _ = decoder.raw_decode(body[m.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for k in ("score", "scores"):
                if k in obj:
                    value = obj[k]
                    break
        if value is not None:
            break
    if value is None:
        m = re.search(r"scores?\"?\s*[:=]\s*\"?\[([^\]]*)\]", body, re.IGNORECASE)
        if m is None:
            return None, f"no score list in the answer: {body[:80]!r}"
        value = "[" + m.group(1) + "]"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, f"score is not a list of numbers: {value[:40]!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None, f"score is not a list of numbers: {str(value)[:40]!r}"
    if len(value) != n:
        return None, f"expected {n} scores, got {len(value)}"
    for v in value:
        if not low <= v <= high or v != v:
            return None, f"score {v} outside {low:g}..{high:g}"
    return [float(v) for v in value], None


_PREFIX = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|(?:edit(?:ing)?\s+)?instruction\s*:|rewritten\s*:|answer\s*:)\s*",
                     re.IGNORECASE)


def clean_instruction(text: str, max_chars: int = 300) -> tuple[str | None, str | None]:
    """The instruction in a writer's answer: first non-empty line, without labels or quotes.

    Returns (instruction, None) or (None, reason).
    """
    body = _strip(text)
    line = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"'`\u201c\u201d").strip()
    if not line:
        return None, "empty answer"
    if not re.search(r"[^\W\d_]", line):  # any letter, in any script
        return None, f"no words in the answer: {line[:40]!r}"
    if len(line) > max_chars:
        return None, f"answer longer than {max_chars} characters"
    return " ".join(line.split()), None
