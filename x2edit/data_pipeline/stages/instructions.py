"""Instruction writers.

- ``template_instructions``: Shape World's templates (needs the exact edit from ``shapeworld_expert``).
- ``chat_instructions``: an LLM or VLM loaded by path, prompted through its chat template, that
  either writes an instruction of the sample's task for the source image ("write") or rephrases
  an existing instruction ("rewrite"). An unusable answer drops the sample with the reason.
"""

from __future__ import annotations

import dataclasses

from x2edit.data_pipeline.stages.base import Stage, check_model_path, register_stage
from x2edit.tasks import get_task

WRITE_PROMPT = (
    "Look at the image. Write one image-editing instruction of this kind: {description} "
    "Examples of the kind: {examples}. The edit must make sense for this image and say exactly what "
    "should change. Answer with the instruction only."
)
REWRITE_PROMPT = (
    "Rewrite this image-editing instruction in other words, keeping its meaning and every detail "
    "(objects, colors, positions, amounts): \"{instruction}\". Answer with the rewritten instruction only."
)


@register_stage("template_instructions")
class TemplateInstructions(Stage):
    """Shape World instructions from varied templates and synonyms (deterministic per seed)."""

    role = "instructions"

    @dataclasses.dataclass
    class Params:
        pass

    @property
    def requires(self):
        return frozenset({"edit"})

    @property
    def provides(self):
        return frozenset({"instruction"})

    def process(self, batch):
        from x2edit.data_pipeline.shapeworld.world import instruction_for

        for s in batch:
            if not s.kept:
                continue
            text, extra = instruction_for(s.extra["pair"])
            s.instruction = text
            s.provenance.update(extra)
            s.provenance["instruction_writer"] = self.name
        return batch


@register_stage("chat_instructions")
class ChatInstructions(Stage):
    """Instructions from a chat model by path.

    Args (Params):
        path: local model directory.
        mode: "write" (a new instruction for the image and task) or "rewrite" (paraphrase).
        vision: the model is a VLM and sees the source image (needed for "write").
        prompt: custom prompt; placeholders {description}, {examples}, {task}, {instruction}.
    """

    role = "instructions"
    uses_model = True

    @dataclasses.dataclass
    class Params:
        path: str
        mode: str = "write"
        vision: bool = True
        prompt: str | None = None
        max_new_tokens: int = 64
        device: str = "auto"
        dtype: str = "auto"
        batch_size: int = 1

    @property
    def requires(self):
        if self.params.mode == "rewrite":
            return frozenset({"instruction"} | ({"source"} if self.params.vision else set()))
        return frozenset({"source", "task"})

    @property
    def provides(self):
        return frozenset({"instruction"})

    def validate(self):
        if self.params.mode not in ("write", "rewrite"):
            raise ValueError(f"{self.name}: mode must be 'write' or 'rewrite', got {self.params.mode!r}")
        if self.params.mode == "write" and not self.params.vision:
            raise ValueError(f"{self.name}: mode 'write' needs a vision model (vision: true) to see the image")
        check_model_path(self.name, self.params.path)

    def setup(self):
        from x2edit.data_pipeline.chat import ChatModel

        self.model = ChatModel(self.params.path, self.params.vision, self.params.device, self.params.dtype)

    def prompt_for(self, s) -> str:
        template = self.params.prompt or (REWRITE_PROMPT if self.params.mode == "rewrite" else WRITE_PROMPT)
        fields = {"instruction": s.instruction or ""}
        if s.task is not None:
            t = get_task(s.task)
            fields.update(task=t.name, description=t.description, examples="; ".join(f'"{e}"' for e in t.examples[:3]))
        return template.format(**fields)

    def process(self, batch):
        from x2edit.data_pipeline.chat import clean_instruction

        if not hasattr(self, "model"):
            self.setup()
        for s in batch:
            if not s.kept:
                continue
            images = [s.source] if self.params.vision else []
            answer = self.model.generate(self.prompt_for(s), images, self.params.max_new_tokens)
            text, reason = clean_instruction(answer)
            if text is None:
                s.drop(self.name, "no usable instruction", reason)
                continue
            if self.params.mode == "rewrite":
                s.provenance["original_instruction"] = s.instruction
            s.instruction = text
            s.provenance["instruction_writer"] = self.name
            s.provenance["instruction_model"] = self.params.path
        return batch
