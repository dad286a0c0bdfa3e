"""AutoLoRA benchmark: retrieval of LoRAs by their weights, and gated fusion of 2 and 3 LoRAs, exactly.

    python benchmarks/autolora.py --pool runs/autolora/pool --out runs/autolora/bench \
        [--encoder FILE] [--gate FILE] [--quick]

Retrieval. The searched pool is the index of ``POOL/loras`` without the LoRAs the encoder trained on:
held-out instances of seen concepts, every instance of the unseen concepts, near-duplicates and noise
LoRAs. A query is a phrasing of a concept; the relevant LoRAs are those of that concept (near-
duplicates included: they do it too). Three query sets: held-out instances (seen concepts, training
phrasings), unseen concepts (concepts the encoder never saw), unseen phrasing (seen concepts, the
held-out synonym in held-out templates). R@1, R@5 and MRR of the weight encoder and of three
baselines: random (exact chance), filename/metadata text match (MiniLM on the file name, title and
trigger words) and flattened-dW PCA + ridge regression to the text space (trained on the same LoRAs).

Composition. For each combination of concepts the pool has a jointly trained LoRA for, and as many
more compatible combinations of 2 and 3 concepts (``--combos``, drawn with a fixed seed among the
concepts with a kept held-out instance; no joint LoRA for these), the held-out
instance of each concept (never seen by the encoder or the gate), on held-out scenes, with the
combined instruction, by each fusion (``x2edit.retrieval.fusion``) and by the joint LoRA (upper bound), in
1 step (the pipeline's edit) and in 4 and 8 steps of the LoRA flow (``x2edit.retrieval.flow``): edit gain
against the exact render with all concepts applied, per-concept attribute accuracy (nearest exact
render inside the concept's region), all-correct rate, error inside / outside the edited region,
per-scene win rate of the gate against each baseline (by edit gain), and the gate's cost per step.

Writes ``OUT/autolora.json`` and ``OUT/autolora.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from x2edit.data_pipeline.metrics import psnr
from x2edit.data_pipeline.shapeworld.concepts import ConceptWorld, get_concept, instruction

BASELINES = ("sum", "average", "switch", "composite", "klora", "topk_select")  # klora: k = 2 only (the paper's)


# -- retrieval -----------------------------------------------------------------------------------


def _ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q,) 1-based rank of the first relevant item per query, from (Q, N) scores and (Q, N) bool."""
    order = np.argsort(-scores, axis=1, kind="stable")
    hit = np.take_along_axis(relevant, order, axis=1)
    return hit.argmax(1) + 1


def _metrics(ranks: np.ndarray) -> dict:
    return {"R@1": float(np.mean(ranks <= 1)), "R@5": float(np.mean(ranks <= 5)), "MRR": float(np.mean(1 / ranks))}


def _chance(relevant: np.ndarray, candidates: np.ndarray | None = None) -> dict:
    """Expected metrics of a uniformly random ranking of each query's candidates (exact; default: all N)."""
    sizes = candidates.sum(1) if candidates is not None else np.full(len(relevant), relevant.shape[1])
    out = {"R@1": [], "R@5": [], "MRR": []}
    for r, n in zip(relevant.sum(1), sizes):
        n = int(n)
        out["R@1"].append(r / n)
        out["R@5"].append(1 - math.comb(n - r, min(5, n)) / math.comb(n, min(5, n)))
        # E[1 / rank of the first of r relevant among n] = sum_k P(first = k) / k
        out["MRR"].append(sum(math.comb(n - k, r - 1) / math.comb(n, r) / k for k in range(1, n - r + 2)))
    return {k: float(np.mean(v)) for k, v in out.items()}


def _dw_features(factor_list: list[dict]) -> dict[str, np.ndarray]:
    """{module: (N, out*in) flattened s B A}, zeros where a LoRA lacks the module; each LoRA's whole
    vector scaled to unit norm (as the encoder ignores overall strength)."""
    modules = sorted({m for f in factor_list for m in f})
    shapes = {}
    for f in factor_list:
        for m, (A, B, _) in f.items():
            shapes[m] = (B.shape[0], A.shape[1])
    norms = np.zeros(len(factor_list))
    out = {}
    for m in modules:
        rows = np.zeros((len(factor_list), shapes[m][0] * shapes[m][1]), dtype=np.float32)
        for i, f in enumerate(factor_list):
            if m in f:
                A, B, s = f[m]
                rows[i] = (s * B.double() @ A.double()).flatten().numpy()
        norms += (rows.astype(np.float64) ** 2).sum(1)
        out[m] = rows
    for m in modules:
        out[m] /= np.sqrt(norms).clip(1e-12)[:, None]
    return out


def pca_ridge(train: list[dict], train_text: np.ndarray, test: list[dict], dims: int = 32,
              ridge: float = 1e-2) -> np.ndarray:
    """Baseline: PCA of the flattened updates (fitted on ``train``) + ridge regression to the text space.
    Returns (N_test, D) unit predictions. Computed through Gram matrices, module by module."""
    feats = _dw_features(train + test)
    n = len(train)
    gram, cross = np.zeros((n, n)), np.zeros((len(test), n))
    for rows in feats.values():
        x = rows.astype(np.float64)
        mu = x[:n].mean(0)
        xt, xs = x[:n] - mu, x[n:] - mu
        gram += xt @ xt.T
        cross += xs @ xt.T
    lam, vec = np.linalg.eigh(gram)
    keep = np.argsort(lam)[::-1][: min(dims, n - 1)]
    lam, vec = lam[keep].clip(1e-12), vec[:, keep]
    s_train = vec * np.sqrt(lam)  # (n, d) PCA scores
    s_test = cross @ vec / np.sqrt(lam)
    W = np.linalg.solve(s_train.T @ s_train + ridge * np.eye(len(lam)), s_train.T @ train_text)
    pred = s_test @ W
    return pred / np.linalg.norm(pred, axis=1, keepdims=True).clip(1e-12)


def _bootstrap(ranks: np.ndarray, reps: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of R@1 over queries resampled with replacement."""
    g = np.random.default_rng(seed)
    hits = (ranks <= 1).astype(float)
    means = hits[g.integers(0, len(hits), size=(reps, len(hits)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def retrieval_benchmark(pool: Path, manifest: dict, encoder_path: str | None, index_path: Path, quick: bool) -> dict:
    """Retrieval over the whole pool as a user's folder holds it: every kept LoRA is a candidate, the encoder's
    training LoRAs included, except, for each query, its own concept's training LoRAs (they would answer it
    trivially). Relevant: the concept's LoRAs the encoder never saw (held-out instances, trained on scenes of
    their own; unseen concepts' instances; near-duplicates). Every seen concept with a kept held-out LoRA is
    queried with all its training phrasings; R@1 has a bootstrap interval. Signals: the weight encoder, the
    text the file carries (its name and header, as real folders name files: ``PoolConfig.naming``), the index's
    routing between the two (``Routing.pick`` per query, on the query's candidates), and the dW PCA + ridge
    baseline."""
    from x2edit.retrieval.encoder import TextEncoder, read_factors
    from x2edit.retrieval.index import LoraIndex, build_index, read_index

    t0 = time.perf_counter()
    counts = build_index(pool / "loras", index_path, encoder_path)
    routing = LoraIndex(index_path).routing
    rows = {r["path"]: r for r in read_index(index_path)[0]}
    by_file = {e["file"]: e for e in manifest["loras"]}
    searched = [(f"loras/{p}", r) for p, r in rows.items() if r["status"] == "ok" and f"loras/{p}" in by_file]
    entries = [by_file[f] for f, _ in searched]
    emb = np.asarray([r["embedding"] for _, r in searched], dtype=np.float32)  # (N, D)
    file_text = np.asarray([r["text_embedding"] for _, r in searched], dtype=np.float32)  # (N, D)
    text = TextEncoder()
    unseen = set(manifest["config"]["unseen_concepts"])
    never_seen = [e["role"] != "train" for e in entries]
    concepts = sorted({c for e, ns in zip(entries, never_seen) if ns and e["role"] != "noise" for c in e["concepts"]})
    seen = [c for c in concepts if c not in unseen]
    all_seen = sorted(set(manifest["config"]["concepts"]) - unseen)
    queries = {
        "held-out instances": [(c, p) for c in seen for p in get_concept(c).phrases()],
        "unseen concepts": [(c, p) for c in concepts if c in unseen for p in get_concept(c).phrases()],
        "unseen phrasing": [(c, p) for c in seen for p in get_concept(c).phrases(held_out=True)],
    }
    if quick:
        queries = {k: v[:6] for k, v in queries.items()}

    train = [e for e in manifest["loras"] if e["role"] == "train" and e["passed"]]
    train_text = text([get_concept(e["concepts"][0]).description for e in train]).numpy()
    pca = pca_ridge([read_factors(pool / e["file"]) for e in train], train_text,
                    [read_factors(pool / f) for f, _ in searched], dims=32)

    results = {"pool_size": len(searched), "index": counts, "train_loras": len(train),
               "routing": {"text_match": routing.text_match, "known": routing.known},
               "seen_concepts_queried": len(seen), "seen_concepts": len(all_seen),
               "seen_concepts_without_a_kept_heldout_lora": sorted(set(all_seen) - set(seen)),
               "roles": {role: sum(e["role"] == role for e in entries) for role in
                         ("train", "heldout_instance", "unseen_concept", "near_duplicate", "noise")},
               "naming": {k: sum(e.get("naming") == k for e in entries) for k in
                          ("accurate", "paraphrased", "creator", "misleading", "opaque")}, "splits": {}}
    for split, qs in queries.items():
        if not qs:
            continue
        q = text([p for _, p in qs]).numpy()  # (Q, D)
        relevant = np.asarray([[c in e["concepts"] and ns for e, ns in zip(entries, never_seen)] for c, _ in qs])
        own_train = np.asarray([[c in e["concepts"] and e["role"] == "train" for e in entries] for c, _ in qs])
        keep = relevant.any(1)
        q, relevant, own_train, qs = q[keep], relevant[keep], own_train[keep], [x for x, k in zip(qs, keep) if k]
        split_res = {"queries": len(qs), "concepts": len({c for c, _ in qs}),
                     "candidates_per_query": float((~own_train).sum(1).mean()),
                     "relevant_per_query": float(relevant.sum(1).mean()), "chance": _chance(relevant, ~own_train)}
        weight, file_score = q @ emb.T, q @ file_text.T
        candidates = [t[~own] for t, own in zip(file_score, own_train)]  # each query's text cosines, (N_i,)
        routes = [routing.pick(qi, lambda c=c: c) for qi, c in zip(q, candidates)]
        routed = np.where(np.array(routes)[:, None] == "text", file_score, weight)
        split_res["routed to text"] = float(np.mean([r == "text" for r in routes]))
        for method, scores in (("weight encoder", weight), ("file text", file_score), ("routed", routed),
                               ("dW PCA + ridge", q @ pca.T)):
            scores = np.where(own_train, -np.inf, scores)  # the query concept's training LoRAs are not candidates
            ranks = _ranks(scores, relevant)
            split_res[method] = {**_metrics(ranks), "R@1 95%": _bootstrap(ranks)}
        results["splits"][split] = split_res
    results["wall_s"] = time.perf_counter() - t0
    return results


# -- composition ---------------------------------------------------------------------------------


def _pick(manifest: dict, concept: str) -> dict | None:
    """The LoRA of ``concept`` a composition uses: its kept held-out instance (best gain if several)."""
    cands = [e for e in manifest["loras"] if e["role"] == "heldout_instance" and e["passed"] and e["concepts"] == [concept]]
    return max(cands, key=lambda e: e["gain_db"]["1"]) if cands else None


def _combos(manifest: dict, extra: int) -> list[list[str]]:
    """The joint LoRAs' combinations, then ``extra`` more compatible ones of 2 and 3 concepts (half each, drawn
    with a fixed seed) among the concepts of composable families with a kept held-out instance."""
    from x2edit.retrieval.fusion import COMPOSABLE, compatible

    combos = [list(e["concepts"]) for e in manifest["loras"] if e["role"] == "joint"]
    concepts = sorted({c for e in manifest["loras"] for c in e["concepts"]
                       if e["role"] == "heldout_instance" and e["passed"] and c.split(":")[0] in COMPOSABLE})
    rng, seen = np.random.default_rng(23), {tuple(sorted(c)) for c in combos}
    for k in [2] * (extra - extra // 2) + [3] * (extra // 2):
        for _ in range(1000):
            combo = sorted(rng.choice(concepts, size=k, replace=False).tolist()) if len(concepts) >= k else []
            if combo and compatible(combo) and tuple(combo) not in seen:
                seen.add(tuple(combo))
                combos.append(combo)
                break
    return combos


def composition_benchmark(pool: Path, manifest: dict, encoder_path: str | None, gate_path: str | None,
                          quick: bool, extra_combos: int = 0) -> dict:
    from x2edit.adapters import adapter_layers, adapter_names, load_community_lora, remove_adapter
    from x2edit.adapters.fusion import Gated, lora_factors, make_fusion
    from x2edit.registry import load_pipeline
    from x2edit.retrieval.encoder import TextEncoder, load_encoder
    from x2edit.retrieval.flow import LoraFlow
    from x2edit.retrieval.fusion import GateNet, default_gate_path

    cfg = manifest["config"]
    pipe = load_pipeline(cfg["base"])
    pipe.set_progress_bar_config(disable=True)
    for name in adapter_names(pipe.transformer):
        remove_adapter(pipe.transformer, name)
    flow, world = LoraFlow(pipe, cfg["sigma_start"]), ConceptWorld(cfg["resolution"])
    encoder, gate = load_encoder(encoder_path), GateNet.load(gate_path or default_gate_path())
    text = TextEncoder(encoder.config.text_model)
    n_scenes, step_counts = (2, [1, 4]) if quick else (8, [1, 4, 8])
    joints = {tuple(e["concepts"]): e for e in manifest["loras"] if e["role"] == "joint"}
    combos = _combos(manifest, 0 if quick else extra_combos)
    if quick:
        combos = [next(c for c in combos if len(c) == k) for k in (2, 3) if any(len(c) == k for c in combos)]
    loaded: dict[str, str] = {}

    def load(entry) -> str:
        if entry["file"] not in loaded:
            name = f"b{len(loaded):02d}"
            load_community_lora(pipe.transformer, pool / entry["file"], name)
            loaded[entry["file"]] = name
        return loaded[entry["file"]]

    methods = [*BASELINES, "gated", "joint"]
    per_scene, skipped = [], []
    timing = {"gate_s": [], "forward_s": []}
    kernel_calls = {}
    for combo in combos:
        picks = [_pick(manifest, c) for c in combo]
        if any(p is None for p in picks):
            skipped.append({"combo": combo, "reason": "a concept has no kept held-out instance"})
            continue
        names = [load(p) for p in picks]
        joint = load(joints[tuple(combo)]) if tuple(combo) in joints else None
        with torch.no_grad():
            emb = torch.stack([encoder([lora_factors(pipe.transformer, n)])[0] for n in names])
        pairs = [world.pair(combo, seed=i, split="eval") for i in range(n_scenes)]
        rng = np.random.default_rng(0)
        prompts = [instruction([get_concept(c) for c in combo], rng) for _ in pairs]
        caches = [{} for _ in pairs]
        for steps in step_counts:
            for method in methods:
                if (method == "klora" and len(names) != 2) or (method == "joint" and joint is None):
                    continue  # K-LoRA fuses exactly two LoRAs [subject, style]; a drawn combination has no joint LoRA
                if method == "joint":
                    use, fusion = [joint], make_fusion("sum", [joint])
                elif method == "gated":
                    use, fusion = names, Gated(names, gate, emb, text_encoder=text)
                    fusion.set_prompts(prompts)
                else:
                    use, fusion = names, make_fusion(method, names)
                fusion.bind(pipe.transformer)
                t = time.perf_counter()
                outs = flow.edit([p.source for p in pairs], prompts, use, fusion.plan, steps=steps)
                if method == "gated" and steps == step_counts[-1]:
                    timing["forward_s"].append((time.perf_counter() - t) / steps)
                    t = time.perf_counter()
                    for k in range(steps):
                        fusion.layer_gates(torch.full((len(pairs),), flow.s * (1 - k / steps)), k)
                    timing["gate_s"].append((time.perf_counter() - t) / steps)
                for p, o, cache in zip(pairs, outs, caches):
                    acc = world.attribute_accuracy(p, o, cache=cache)
                    diff = np.abs(o.astype(np.float64) - p.target).mean(-1) / 255.0
                    mask = p.mask
                    per_scene.append({
                        "combo": "+".join(combo), "k": len(combo), "steps": steps, "method": method, "seed": p.seed,
                        "gain_db": psnr(o, p.target) - psnr(p.source, p.target),
                        "correct": acc, "all_correct": all(acc.values()),
                        "err_in": float(diff[mask].mean()), "err_out": float(diff[~mask].mean()) if (~mask).any() else None})
        # one kernel call per adapter layer, whatever k is
        from x2edit import kernels

        for k in range(1, len(names) + 1):
            calls = []
            real = kernels.lora_linear
            kernels.lora_linear = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # noqa: B023
            try:
                f = make_fusion("sum", names[:k]).bind(pipe.transformer)
                flow.edit([pairs[0].source], [prompts[0]], names[:k], f.plan, steps=1)
            finally:
                kernels.lora_linear = real
            layers = sum(1 for _, lay in adapter_layers(pipe.transformer) if any(n in lay.adapters for n in names[:k]))
            kernel_calls[str(k)] = {"calls_per_forward": len(calls) // 1, "adapter_layers": layers}
    return {"per_scene": per_scene, "skipped": skipped, "scenes_per_combo": n_scenes, "steps": step_counts,
            "combos": ["+".join(c) for c in combos], "summary": summarize(per_scene, methods, step_counts),
            "gate_cost": {"gate_ms_per_step": 1000 * float(np.mean(timing["gate_s"])) if timing["gate_s"] else None,
                          "step_ms": 1000 * float(np.mean(timing["forward_s"])) if timing["forward_s"] else None,
                          "gate_params": sum(p.numel() for p in gate.parameters())},
            "kernel_calls": kernel_calls}


def summarize(rows: list[dict], methods: list[str], step_counts: list[int]) -> dict:
    out = {}
    for k in sorted({r["k"] for r in rows}):
        for steps in step_counts:
            sel = [r for r in rows if r["k"] == k and r["steps"] == steps]
            if not sel:
                continue
            table = {}
            for m in methods:
                rs = [r for r in sel if r["method"] == m]
                if not rs:
                    continue  # klora at k != 2
                concept_acc = [v for r in rs for v in r["correct"].values()]
                outs = [r["err_out"] for r in rs if r["err_out"] is not None]
                table[m] = {"gain_db": float(np.mean([r["gain_db"] for r in rs])),
                            "attribute_acc": float(np.mean(concept_acc)), "all_correct": float(np.mean([r["all_correct"] for r in rs])),
                            "err_in": float(np.mean([r["err_in"] for r in rs])),
                            "err_out": float(np.mean(outs)) if outs else None, "n": len(rs)}
            gated = {(r["combo"], r["seed"]): r["gain_db"] for r in sel if r["method"] == "gated"}
            baselines = [m for m in BASELINES if m in table]
            for m in baselines:
                other = {(r["combo"], r["seed"]): r["gain_db"] for r in sel if r["method"] == m}
                wins = [1.0 if gated[key] > other[key] + 1e-9 else 0.5 if abs(gated[key] - other[key]) <= 1e-9 else 0.0
                        for key in gated]
                table[m]["gated_win_rate"] = float(np.mean(wins))
            best = max(baselines, key=lambda m: (table[m]["all_correct"], table[m]["gain_db"]))
            table["_best_baseline"] = best
            table["_gated_margin_all_correct"] = table["gated"]["all_correct"] - table[best]["all_correct"]
            out[f"k={k}, steps={steps}"] = table
    return out


# -- report --------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    r = result["retrieval"]
    lines = [f"### Retrieval (pool of {r['pool_size']} LoRAs: " + ", ".join(f"{v} {k}" for k, v in r["roles"].items())
             + "; named " + ", ".join(f"{v} {k}" for k, v in r["naming"].items())
             + f"; {r['seen_concepts_queried']} of {r['seen_concepts']} seen concepts queried)", "",
             "| split | queries | candidates / query | relevant / query | method | R@1 (95% interval) | R@5 | MRR |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for split, s in r["splits"].items():
        for method in ("weight encoder", "file text", "routed", "dW PCA + ridge", "chance"):
            m = s[method]
            ci = f" ({m['R@1 95%'][0]:.2f}-{m['R@1 95%'][1]:.2f})" if "R@1 95%" in m else ""
            name = f"**routed** ({s['routed to text']:.0%} to text)" if method == "routed" else method
            lines.append(f"| {split} | {s['queries']} | {s['candidates_per_query']:.0f} | {s['relevant_per_query']:.1f} | "
                         f"{name} | {m['R@1']:.2f}{ci} | {m['R@5']:.2f} | {m['MRR']:.2f} |")
    rt = r["routing"]
    lines += ["", f"Routing thresholds, calibrated on the encoder's training phrasings: text match >= "
              f"{rt['text_match']:.3f}, known query >= {rt['known']:.3f}."]
    if r["seen_concepts_without_a_kept_heldout_lora"]:
        lines += ["", "Seen concepts not queried (no kept held-out LoRA): "
                  + ", ".join(r["seen_concepts_without_a_kept_heldout_lora"]) + "."]
    c = result["composition"]
    lines += ["", f"### Composition ({len(c['combos'])} combinations: {', '.join(c['combos'])}; "
              f"{c['scenes_per_combo']} held-out scenes each; the joint LoRA only where the pool trained one)", "",
              "| LoRAs, steps | method | scenes | gain (dB) | attribute acc. | all correct | err in | err out | gated wins |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, table in c["summary"].items():
        for m, v in table.items():
            if m.startswith("_"):
                continue
            win = f"{v['gated_win_rate']:.2f}" if "gated_win_rate" in v else "-"
            eo = "-" if v["err_out"] is None else f"{v['err_out']:.3f}"
            name = f"**{m}**" if m == "gated" else m + (" (upper bound)" if m == "joint" else "")
            lines.append(f"| {key} | {name} | {v['n']} | {v['gain_db']:+.2f} | {v['attribute_acc']:.2f} | {v['all_correct']:.2f} | "
                         f"{v['err_in']:.3f} | {eo} | {win} |")
        lines.append(f"| {key} | gated - best baseline ({table['_best_baseline']}), all correct | | | | "
                     f"{table['_gated_margin_all_correct']:+.2f} | | | |")
    g = c["gate_cost"]
    if g["gate_ms_per_step"] is not None:
        lines += ["", f"Gate cost: {g['gate_ms_per_step']:.2f} ms per step for all layers ({g['gate_params']:,} "
                  f"parameters), against {g['step_ms']:.0f} ms for the step's transformer calls. Kernel calls per "
                  "forward: " + ", ".join(f"k={k}: {v['calls_per_forward']} for {v['adapter_layers']} adapter layers"
                                          for k, v in c["kernel_calls"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="pool directory (x2edit lora pool)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--encoder", default=None, help="weight encoder (default: the shipped one)")
    parser.add_argument("--gate", default=None, help="fusion gate (default: the shipped one)")
    parser.add_argument("--quick", action="store_true", help="a few queries, one combination per size, 2 scenes")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--combos", type=int, default=24,
                        help="compatible combinations drawn beside the joint LoRAs' (half of 2 concepts, half of 3)")
    parser.add_argument("--only", choices=["retrieval", "composition"], default=None,
                        help="run one part; the other is kept from OUT/autolora.json (listed under 'kept')")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from x2edit.retrieval.pool import load_manifest

    pool, out = Path(args.pool), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(pool)
    t0 = time.perf_counter()
    result = {"pool": str(pool), "quick": args.quick, "pool_summary": manifest["summary"], "bar_db": manifest["bar_db"]}
    if args.only:
        previous = out / "autolora.json"
        if not previous.is_file():
            raise SystemExit(f"--only {args.only} keeps the other part from {previous}, which does not exist")
        kept = "composition" if args.only == "retrieval" else "retrieval"
        old = json.loads(previous.read_text())
        result[kept], result["kept"] = old[kept], sorted({kept, *old.get("kept", [])} - {args.only})
    if args.only != "composition":
        result["retrieval"] = retrieval_benchmark(pool, manifest, args.encoder, out / "index.parquet", args.quick)
    if args.only != "retrieval":
        result["composition"] = composition_benchmark(pool, manifest, args.encoder, args.gate, args.quick, args.combos)
    result["wall_s"] = time.perf_counter() - t0
    (out / "autolora.json").write_text(json.dumps(result, indent=1))
    (out / "autolora.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
