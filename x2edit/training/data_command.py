"""`x2edit data inspect PATH [--config FILE]`: what a dataset holds and what a config keeps of it.

For each reader (the config's sources, or one reader for PATH) it reads the metadata of every sample
(and the image headers, as training's index does) and reports: member layouts, task labels and the
task each maps to, how instructions were picked, every score field with its values' ranges, the
outcome of every sample (kept, or the reason it is dropped) and the dropped samples themselves. It
goes through ``EditReader.scan``, the same checks training runs, so what it reports kept is what a
run trains on.
"""

from __future__ import annotations

import glob
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="what a dataset holds and what a config keeps of it",
                       description="Layouts, task labels and how each maps, score fields with their ranges, the "
                                   "outcome of every sample, and the dropped samples with the reason.")
    p.add_argument("path", nargs="?", help="a dataset: directory, tar, .jsonl or glob (with a training config: "
                                           "inspect the sources at or under PATH; default all of them)")
    p.add_argument("--config", help="a reader config (a YAML mapping with format: ...) or an `x2edit train` config "
                                    "(its data.source / data.sources and data.filters)")
    p.add_argument("--format", help="the reader for PATH without --config (default: detected from the files)")
    p.add_argument("--limit", type=int, help="look at the first N samples of each source only")
    p.add_argument("--no-images", action="store_true", help="read metadata only, not image headers (faster; "
                                                            "undecodable images then go unseen)")
    p.add_argument("--drops", type=int, default=3, help="dropped samples listed per reason (-1: all; default 3)")
    p.add_argument("--json", dest="json_out", help="also write the report to this file as JSON")


def run(args) -> int:
    specs = resolve_specs(args.path, args.config, args.format)
    reports = [inspect_source(spec, images=not args.no_images, limit=args.limit, drops=args.drops) for spec in specs]
    total = sum(float(s.get("weight", 1.0)) for s in specs)
    for report in reports:
        if len(specs) > 1:
            report["share"] = float(report["weight"]) / total
        print(format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(reports, ensure_ascii=False, indent=1))
    return 0


# -- which readers ---------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    """The reader for a path without a config: our shards (src.png members) or upstream's for tars,
    jsonl for .jsonl files. Raises ``ValueError`` when it cannot tell."""
    from x2edit.data_pipeline.shards import iter_tar

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        files = [p] if p.is_file() else sorted(Path(m) for m in glob.glob(path, recursive=True))
    if not files:
        raise FileNotFoundError(f"nothing found at {path}")
    tars = [f for f in files if f.name.lower().endswith((".tar", ".tar.gz", ".tgz"))]
    if tars:
        for _, members in iter_tar(tars[0]):
            return "x2edit" if "src.png" in members else "x2edit_upstream"
        return "x2edit_upstream"
    if any(f.suffix == ".jsonl" for f in files):
        return "jsonl"
    raise ValueError(f"cannot tell the format of {path}: give --format, or --config with a reader config "
                     "(parquet needs its columns map)")


def _under(a: str, b: str) -> bool:
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


def resolve_specs(path: str | None, config: str | None, fmt: str | None) -> list[dict]:
    """Reader configs to inspect: PATH alone (detected or ``fmt``), a reader config (PATH replaces its
    path), or a training config's sources (those at or under PATH)."""
    if config is None:
        if path is None:
            raise ValueError("give a PATH, a --config, or both")
        return [{"format": fmt or detect_format(path), "path": path}]
    data = yaml.safe_load(Path(config).read_text()) if Path(config).is_file() else None
    if data is None and not Path(config).is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    if not isinstance(data, dict):
        raise ValueError(f"{config}: expected a mapping (a reader config or an x2edit train config)")
    if "format" in data:
        return [{**data, **({"path": path} if path else {})}]
    from x2edit.training.config import load_config

    d = load_config(config).data
    specs = [{**s, "filters": [*s.get("filters", []), *d.filters]} for s in d.readers]
    if not specs:
        raise ValueError(f"{config}: data.source is Shape World (generated, nothing to inspect); no reader sources")
    if path is None:
        return specs
    chosen = [s for s in specs if any(_under(p, path) for p in ([s["path"]] if isinstance(s["path"], str)
                                                              else s["path"]))]
    if not chosen:
        raise ValueError(f"no source of {config} is at or under {path}; its sources: {[s['path'] for s in specs]}")
    return chosen


# -- the report ------------------------------------------------------------------------------------


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"


class _ScoreField:
    """What one metadata field holds across samples: numbers, lists of numbers, or other values."""

    def __init__(self):
        self.numbers, self.list_items, self.list_sums = [], [], []
        self.lengths, self.other = Counter(), Counter()

    def add(self, value: Any) -> None:
        from x2edit.training.data import parse_score, score_list

        items = score_list(value)
        if items is not None:
            self.lengths[len(items)] += 1
            self.list_items += items
            self.list_sums.append(sum(items))
        elif (x := parse_score(value)) is not None:
            self.numbers.append(x)
        else:
            self.other[repr(value)[:24]] += 1

    @property
    def is_score(self) -> bool:
        return bool(self.numbers or self.list_sums)

    def describe(self) -> str:
        parts = []
        if self.numbers:
            parts.append(f"{len(self.numbers)} numbers {_range(self.numbers)}")
        if self.list_sums:
            lengths = ", ".join(f"{n} of {k}" for k, n in sorted(self.lengths.items()))
            items = f", items {_range(self.list_items)}" if self.list_items else ""
            parts.append(f"lists ({lengths}){items}, sums {_range(self.list_sums)}")
        if self.other:
            parts.append("not a number: " + ", ".join(f"{v} x{n}" for v, n in self.other.most_common(3)))
        return "; ".join(parts)


def inspect_source(spec: dict, images: bool = True, limit: int | None = None, drops: int = 3) -> dict:
    """What one reader config reads and keeps, as a JSON-able dict (see ``format_report``)."""
    from x2edit.training.data import OTHER_TASK, build_reader, has_cjk

    spec = dict(spec)
    weight = spec.pop("weight", 1.0)
    reader = build_reader(spec)
    layouts, instruction_keys, languages = Counter(), Counter(), Counter()
    labels: dict[tuple, Counter] = defaultdict(Counter)
    fields: dict[str, _ScoreField] = defaultdict(_ScoreField)
    dropped: dict[str, list[str]] = defaultdict(list)
    for s in reader.scan(images=images, limit=limit):
        raw = s.raw
        if "layout" in raw.notes:
            layouts[raw.notes["layout"]] += 1
        how = "from label" if raw.notes.get("task_from") == "label" else "task key"
        target = s.task if s.outcome != "unknown_task" else None
        if target == OTHER_TASK:
            target = "other"
        key = (str(raw.notes.get("label", "")) if raw.notes.get("label") is not None else "",
               str(raw.task) if raw.task not in (None, "") else "(none)", target or "(unknown)", how)
        labels[key]["seen"] += 1
        labels[key]["kept"] += s.outcome == "kept"
        if isinstance(raw.instruction, str):
            instruction_keys[raw.notes.get("instruction_key") or "instruction"] += 1
            languages["zh" if has_cjk(raw.instruction) else "en"] += 1
        for name, value in raw.fields.items():
            fields[name].add(value)
        if s.outcome != "kept" and (drops < 0 or len(dropped[s.outcome]) < drops):
            dropped[s.outcome].append(f"{s.where}: {s.detail}" if s.detail else s.where)
    stats = reader.stats
    for reason, examples in stats.examples.items():  # format-level drops have no sample to scan
        if reason not in dropped:
            dropped[reason] = examples if drops < 0 else examples[:drops]
    return {
        "format": reader.format, "path": spec.get("path"), "weight": weight, "limit": limit,
        "filters": [str(r) for r in reader.rules],
        "seen": stats.seen, "kept": stats.kept,
        "outcomes": {"kept": stats.kept, **dict(stats.dropped_by_reason.most_common())},
        "layouts": dict(layouts.most_common()),
        "labels": [{"label": k[0], "task_label": k[1], "task": k[2], "how": k[3], **dict(c)}
                   for k, c in sorted(labels.items(), key=lambda kv: (kv[0][0], -kv[1]["seen"]))],
        "instructions": {"language": getattr(reader, "language", None), "keys": dict(instruction_keys.most_common()),
                         "text": dict(languages)},
        "scores": {name: f.describe() for name, f in sorted(fields.items()) if f.is_score},
        "drops": dict(dropped),
    }


def format_report(r: dict) -> str:
    """The text `x2edit data inspect` prints for one source."""
    share = f", {r['share']:.0%} of batches" if "share" in r else ""
    lines = [f"{r['format']} data at {r['path']} (weight {r['weight']:g}{share})"
             + (f", first {r['limit']} samples" if r["limit"] else "")]
    outcomes = ", ".join(f"{k}: {n}" for k, n in r["outcomes"].items() if k != "kept")
    lines.append(f"  samples: seen {r['seen']}, kept {r['kept']}" + (f"; dropped: {outcomes}" if outcomes else ""))
    if r["layouts"]:
        lines.append("  layouts (source + target): " + ", ".join(f"{k}: {n}" for k, n in r["layouts"].items()))
    if r["labels"]:
        lines.append("  task labels (label field | task label -> task: seen, kept):")
        width = max(len(x["label"]) for x in r["labels"])
        for x in r["labels"]:
            via = " (from label)" if x["how"] == "from label" else ""
            lines.append(f"    {x['label']:<{width}} | {x['task_label']} -> {x['task']}{via}: {x['seen']}, {x['kept']}")
    ins = r["instructions"]
    if ins["keys"]:
        lang = f"language {ins['language']}; " if ins["language"] else ""
        text = ", ".join(f"{k} {n}" for k, n in sorted(ins["text"].items()))
        lines.append(f"  instructions ({lang}read from " + ", ".join(f"{k}: {n}" for k, n in ins["keys"].items())
                     + f"; text: {text})")
    if r["scores"]:
        lines.append("  score fields:")
        width = max(map(len, r["scores"]))
        lines += [f"    {name:<{width}}  {desc}" for name, desc in r["scores"].items()]
    lines.append("  filters, in order: " + ("; ".join(r["filters"]) or "none"))
    if r["drops"]:
        lines.append("  dropped samples (reason: where: detail):")
        for reason, examples in r["drops"].items():
            lines.append(f"    {reason} ({r['outcomes'].get(reason, len(examples))})")
            lines += [f"      {e}" for e in examples]
    return "\n".join(lines)
