"""What a LoRA file says about itself without a weight encoder trained for its base: its text and a
base-free fingerprint of its weights.

The index (``x2edit.retrieval.index``) searches by three signals:

- ``weight``: the trained weight encoder's embedding (``x2edit.retrieval.encoder``), in the text model's space;
  only for LoRAs of the base the encoder was trained on.
- ``text``: the text model's embedding of what the file carries (``file_text``): its title, trigger words,
  file name and descriptive header fields. Every readable LoRA has it, whatever its base.
- ``fingerprint``: ``spectrum_fingerprint``, the shape of the singular-value spectra of its per-module updates,
  which needs no model at all; it finds copies, re-saves and retrains of a LoRA given as the query
  (``LoraIndex.search_like``), not text.

A text query is scored by one signal, picked per query (``Routing``): a weight encoder knows the concepts it
was trained on and guesses at others, while a file's text is only as good as its name. So the weight signal
scores the query when the query is one the encoder was trained on (its cosine with one of the encoder's training
phrasings reaches ``Routing.known``); otherwise the text scores it when some file's text matches it as closely
as two phrasings of one concept match each other (top text cosine >= ``Routing.text_match``), and the weight
signal when none does. Files without a weight signal (another base) are scored by their text on either route.
Both thresholds are calibrated on the encoder's training phrasings alone (``calibrate_routing``: no retrieval
result enters them) and recorded in the encoder, then in the index; an index without them treats every query
as new to the encoder, with ``TEXT_MATCH``. A mix ``w * weight + (1 - w) * text`` was measured first and
dropped: no w was at least the better signal on both seen and unseen concepts (``docs/autolora.md``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Header fields that describe what a LoRA does (kohya sd-scripts, modelspec, civitai-style exports).
DESCRIPTIVE_FIELDS = ("modelspec.title", "modelspec.description", "modelspec.tags", "ss_output_name",
                      "modelspec.trigger_phrase", "trigger_phrase", "trigger_words", "description", "tags")
SPECTRUM = 8  # singular values kept per module (LoRA ranks are mostly 4 to 64; the top 8 carry most energy)
NORM_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# Where no encoder calibrated it: the median cosine of two training phrasings of one concept under MiniLM
# (x2edit-tiny's encoder: 0.659), i.e. a file text at least as close to the query as a typical paraphrase.
TEXT_MATCH = 0.66
SIGNALS = ("auto", "weight", "text")  # a search's route: picked per query, or one signal forced


def describe_metadata(metadata: dict[str, str], path: Path) -> tuple[str, list[str]]:
    """(title, trigger words) from a header: modelspec.title / ss_output_name / the file stem;
    modelspec.trigger_phrase, trigger words fields, kohya's most frequent tags."""
    title = metadata.get("modelspec.title") or metadata.get("ss_output_name") or path.stem
    words: list[str] = []
    for key in ("modelspec.trigger_phrase", "trigger_phrase", "trigger_words", "trigger_word", "ss_trigger_words"):
        if metadata.get(key):
            words += [w.strip() for w in str(metadata[key]).split(",") if w.strip()]
    if metadata.get("ss_tag_frequency"):
        try:
            counts: dict[str, int] = {}
            for tags in json.loads(metadata["ss_tag_frequency"]).values():
                for tag, n in tags.items():
                    counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
            words += [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:5]]
        except (ValueError, AttributeError, TypeError):
            pass  # a malformed optional field: the title still describes the file
    return title, list(dict.fromkeys(words))


def _words(name: str) -> str:
    """A file stem as words: ``mystyle_v3-final`` -> "mystyle v3 final"; camelCase split."""
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return " ".join(w for w in re.split(r"[\s_\-.+]+", name) if w)


def file_text(path: str | Path, title: str, trigger_words: list[str], metadata: dict[str, str]) -> str:
    """The text a LoRA file carries, as one string for the text model: title, trigger words, the file name as
    words and the descriptive header fields, each once, in that order (at most 1,000 characters)."""
    parts = [title, ", ".join(trigger_words), _words(Path(path).stem)]
    parts += [str(metadata[k]) for k in DESCRIPTIVE_FIELDS if metadata.get(k)]
    seen, out = set(), []
    for p in parts:
        p = " ".join(p.split())
        if p and p.lower() not in seen:
            seen.add(p.lower())
            out.append(p)
    return ". ".join(out)[:1000]


def _spectrum(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """(r,) singular values of scale * B A, (N, r) @ (r, K), from r x r factors: B = Q_B R_B and A^T = Q_A R_A
    give B A = Q_B (R_B R_A^T) Q_A^T, whose singular values are those of the small R_B R_A^T."""
    rb = torch.linalg.qr(B.double(), mode="r")[1]  # (r, r)
    ra = torch.linalg.qr(A.double().T, mode="r")[1]  # (r, r)
    return torch.linalg.svdvals(rb @ ra.T) * abs(scale)


def spectrum_fingerprint(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> np.ndarray:
    """A base-free fingerprint of a LoRA's weights, (2 * SPECTRUM + len(NORM_QUANTILES) + 2,) float32, unit norm.

    Per module, the top ``SPECTRUM`` singular values of its update divided by their norm (the spectrum's shape:
    how many directions it uses), then over modules their mean and standard deviation; with them the
    quantiles of the modules' log update norms (centred: the spread of strength across layers), the log of the
    number of modules and of the mean rank. Nothing depends on module names or sizes, so LoRAs of any base
    compare; a file re-saved in another layout, or with its rank padded, gives the same fingerprint.
    ``factors``: ``read_community_lora``'s {module: (A (r, K), B (N, r), scale)}.
    """
    if not factors:
        raise ValueError("a LoRA with no modules has no fingerprint")
    shapes, norms, ranks = [], [], []
    for A, B, scale in factors.values():
        s = _spectrum(A, B, scale)
        norm = float(s.norm())
        top = torch.zeros(SPECTRUM, dtype=torch.float64)
        k = min(SPECTRUM, len(s))
        if norm > 0:
            top[:k] = s[:k] / norm
        shapes.append(top)
        norms.append(norm)
        ranks.append(int((s > 1e-6 * max(norm, 1e-30)).sum()))  # the numerical rank: zero padding does not count
    shapes_t = torch.stack(shapes)  # (M, SPECTRUM)
    log_norms = np.log(np.maximum(np.array(norms), 1e-12))
    quantiles = np.quantile(log_norms, NORM_QUANTILES)
    vec = np.concatenate([shapes_t.mean(0).numpy(), shapes_t.std(0, unbiased=False).numpy(),
                          quantiles - quantiles.mean(), [np.log(len(factors)), np.log(max(np.mean(ranks), 1.0))]])
    n = np.linalg.norm(vec)
    return (vec / n if n > 0 else vec).astype(np.float32)


def calibrate_routing(phrases: np.ndarray, concept_of: list[str]) -> tuple[float, float]:
    """(text_match, known) from an encoder's training phrasings: the median and the 90th percentile of the
    cosines between two phrasings of one concept (a query at least that close to a training phrasing is that
    phrasing, near enough; a file text at least as close as a typical paraphrase is a clear match).

    Args:
        phrases: (P, D) unit text embeddings of the phrasings; concept_of: (P,) the concept of each.
    """
    concept_of = np.asarray(concept_of)
    same = (concept_of[:, None] == concept_of[None]) & ~np.eye(len(concept_of), dtype=bool)
    if not same.any():
        raise ValueError("calibrating the routing needs at least two phrasings of one concept")
    cos = (phrases @ phrases.T)[same]
    return float(np.median(cos)), float(np.percentile(cos, 90))


@dataclass(frozen=True)
class Routing:
    """Which signal scores a text query (the module docstring).

    Args:
        text_match: a file text at least this close to the query (cosine) is a clear match.
        known: a query at least this close to one of ``vocabulary`` is one the encoder was trained on.
        vocabulary: (P, D) float32 unit rows, the encoder's training phrasings embedded; empty: none known.
    """

    text_match: float = TEXT_MATCH
    known: float = 1.0
    vocabulary: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def is_known(self, q: np.ndarray) -> bool:
        """Whether the query ``q`` (D,) is one the encoder was trained on."""
        return len(self.vocabulary) > 0 and float((self.vocabulary @ q).max()) >= self.known

    def pick(self, q: np.ndarray, text_scores: Callable[[], np.ndarray]) -> str:
        """"weight" or "text": the signal that scores query ``q`` (D,), given its text cosines with the candidate
        files (``text_scores()``, (N,): asked for only where the query is new to the encoder)."""
        if self.is_known(q):
            return "weight"
        return "text" if float(np.max(text_scores())) >= self.text_match else "weight"

    def to_meta(self) -> str:
        """The index's ``x2edit.routing`` field: JSON, the vocabulary as base64 float16."""
        v = np.ascontiguousarray(self.vocabulary, dtype=np.float16)
        return json.dumps({"text_match": self.text_match, "known": self.known, "shape": list(v.shape),
                           "vocabulary": base64.b64encode(v.tobytes()).decode()})

    @classmethod
    def from_meta(cls, value: str | None) -> Routing:
        """``to_meta``'s inverse; None (an index without it): every query new to the encoder."""
        if not value:
            return cls()
        try:
            d = json.loads(value)
            v = np.frombuffer(base64.b64decode(d["vocabulary"]), np.float16).reshape(d["shape"]).astype(np.float32)
            return cls(float(d["text_match"]), float(d["known"]), v)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the index's routing field is damaged ({e}): rebuild the index") from e
