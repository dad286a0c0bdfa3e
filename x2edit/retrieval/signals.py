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

A text query scores a file ``w * weight + (1 - w) * text`` where it has both, and by its text alone where it has
no weight signal (another base): the missing signal counts as the text's own evidence. ``w`` is tuned on an
encoder's training split (``tune_hybrid_weight``) and recorded in the index (``x2edit lora index
--hybrid-weight``); ``HYBRID_WEIGHT`` where none was.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

# Header fields that describe what a LoRA does (kohya sd-scripts, modelspec, civitai-style exports).
DESCRIPTIVE_FIELDS = ("modelspec.title", "modelspec.description", "modelspec.tags", "ss_output_name",
                      "modelspec.trigger_phrase", "trigger_phrase", "trigger_words", "description", "tags")
SPECTRUM = 8  # singular values kept per module (LoRA ranks are mostly 4 to 64; the top 8 carry most energy)
NORM_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
HYBRID_WEIGHT = 0.5  # w where no tuned value is recorded: the two signals count alike


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


def tune_hybrid_weight(weight_scores: np.ndarray, text_scores: np.ndarray, relevant: np.ndarray,
                       grid: np.ndarray | None = None) -> tuple[float, dict[float, float]]:
    """The w of ``w * weight + (1 - w) * text`` that ranks a relevant file first most often (R@1), on a
    training split: (best w, {w: R@1}); ties go to the w nearest 0.5 (no signal preferred without evidence).

    Args:
        weight_scores, text_scores: (Q, N) cosines of Q training queries with N files, per signal.
        relevant: (Q, N) bool, the files relevant to each query (e.g. every LoRA of the query's concept), or
            (Q,) the one relevant file's index.
        grid: the w tried (default 0, 0.05, ..., 1).
    """
    grid = np.round(np.linspace(0, 1, 21), 2) if grid is None else np.asarray(grid)
    relevant = np.asarray(relevant)
    if relevant.ndim == 1:
        relevant = np.eye(weight_scores.shape[1], dtype=bool)[relevant]
    rows = np.arange(len(relevant))
    table = {}
    for w in grid:
        top = np.argmax(w * weight_scores + (1 - w) * text_scores, axis=1)
        table[float(w)] = float(np.mean(relevant[rows, top]))
    best = max(table, key=lambda w: (table[w], -abs(w - 0.5)))
    return best, table
