"""benchmarks/autolora.py in small: its metrics exactly, and a --quick run on the tiny pool (what CI runs)."""

import itertools
import json

import numpy as np
import torch

from benchmarks.autolora import _bootstrap, _chance, _combos, _metrics, _ranks, main, pca_ridge
from x2edit.retrieval.fusion import compatible


def test_ranks_and_chance_are_exact():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    relevant = np.array([[False, False, True, True], [True, False, False, False]])
    ranks = _ranks(scores, relevant)
    assert ranks.tolist() == [2, 3]
    assert _metrics(ranks) == {"R@1": 0.0, "R@5": 1.0, "MRR": (1 / 2 + 1 / 3) / 2}
    # chance against every ordering of 6 items with 2 relevant
    rel = np.array([[True, True, False, False, False, False]])
    firsts = [min(p.index(0), p.index(1)) + 1 for p in itertools.permutations(range(6))]
    c = _chance(rel)
    assert abs(c["MRR"] - np.mean([1 / f for f in firsts])) < 1e-12
    assert abs(c["R@1"] - np.mean([f <= 1 for f in firsts])) < 1e-12
    assert abs(c["R@5"] - np.mean([f <= 5 for f in firsts])) < 1e-12
    # a query whose candidates are 4 of the 6 (2 left out): chance over those 4
    c4 = _chance(rel, np.array([[True, True, True, True, False, False]]))
    assert abs(c4["R@1"] - 2 / 4) < 1e-12
    lo, hi = _bootstrap(np.array([1] * 30 + [2] * 70))
    assert lo < 0.3 < hi and hi - lo < 0.25


def test_pca_ridge_baseline_learns_a_planted_map():
    """Updates made of one direction per concept plus noise; each concept's text a random unit vector:
    held-out updates are mapped nearest to their own concept's text."""
    g = torch.Generator().manual_seed(0)
    dirs = [(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)) for _ in range(3)]
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1).numpy()

    def lora(c):
        A, B = dirs[c]
        return {"m": (A + 0.1 * torch.randn(2, 6, generator=g), B + 0.1 * torch.randn(5, 2, generator=g), 1.0)}

    train = [lora(c) for c in (0, 1, 2) * 3]
    test = [lora(c) for c in (0, 1, 2)]
    pred = pca_ridge(train, text[[0, 1, 2] * 3], test, dims=4)
    assert (pred @ text.T).argmax(1).tolist() == [0, 1, 2]


def test_drawn_combinations_are_compatible_new_and_reproducible():
    """Beside the joint LoRAs' combinations, drawn ones of 2 and 3 concepts with a kept held-out instance each."""
    heldout = ["background:red", "background:blue", "objects:yellow", "objects:pink", "tone:sepia", "tone:night",
               "tint:green", "style:posterized"]
    manifest = {"loras": [{"role": "heldout_instance", "passed": True, "concepts": [c]} for c in heldout]
                + [{"role": "heldout_instance", "passed": False, "concepts": ["style:cartoon"]},  # not kept
                   {"role": "joint", "passed": True, "concepts": ["background:red", "tone:sepia"]}]}
    combos = _combos(manifest, 8)
    assert combos[0] == ["background:red", "tone:sepia"] and len(combos) == 9
    drawn = combos[1:]
    assert [len(c) for c in drawn] == [2] * 4 + [3] * 4
    assert all(compatible(c) and set(c) <= set(heldout) for c in drawn)
    assert len({tuple(sorted(c)) for c in combos}) == 9  # none twice, the joint one included
    assert _combos(manifest, 8) == combos and _combos(manifest, 0) == combos[:1]


def test_quick_benchmark_on_the_tiny_pool(tiny_pool, tiny_encoder, tiny_gate, tmp_path):
    pool, manifest = tiny_pool
    assert main(["--pool", str(pool), "--out", str(tmp_path), "--encoder", str(tiny_encoder), "--gate",
                 str(tiny_gate), "--quick"]) == 0
    result = json.loads((tmp_path / "autolora.json").read_text())
    r = result["retrieval"]
    # every kept LoRA is a candidate (the encoder's training ones too), every naming kind counted
    assert r["pool_size"] == sum(1 for e in manifest["loras"] if e["file"].startswith("loras/"))
    assert r["roles"]["train"] > 0 and sum(r["naming"].values()) == r["pool_size"]
    for split in ("held-out instances", "unseen concepts", "unseen phrasing"):
        s = r["splits"][split]
        for method in ("weight encoder", "file text", "routed", "dW PCA + ridge", "chance"):
            assert 0 <= s[method]["R@1"] <= s[method]["R@5"] <= 1 and 0 < s[method]["MRR"] <= 1
        assert 0 <= s["routed to text"] <= 1
        lo, hi = s["weight encoder"]["R@1 95%"]
        assert lo <= s["weight encoder"]["R@1"] <= hi
        if split != "unseen concepts":  # a seen concept's training LoRAs are left out of its queries' candidates
            assert s["candidates_per_query"] < r["pool_size"]
    c = result["composition"]
    table = c["summary"]["k=2, steps=1"]
    assert set(table) >= {"sum", "average", "switch", "composite", "klora", "gated", "joint"}
    assert all(0 <= v["all_correct"] <= 1 for m, v in table.items() if not m.startswith("_"))
    assert c["kernel_calls"]["1"]["calls_per_forward"] == c["kernel_calls"]["1"]["adapter_layers"]
    assert c["kernel_calls"]["2"]["calls_per_forward"] == c["kernel_calls"]["2"]["adapter_layers"]
    assert "| gated" not in (tmp_path / "autolora.md").read_text() or "**gated**" in (tmp_path / "autolora.md").read_text()
    # --only retrieval: the composition is kept from the run before, and said to be
    assert main(["--pool", str(pool), "--out", str(tmp_path), "--encoder", str(tiny_encoder), "--gate",
                 str(tiny_gate), "--quick", "--only", "retrieval"]) == 0
    again = json.loads((tmp_path / "autolora.json").read_text())
    assert again["kept"] == ["composition"] and again["composition"] == c and "retrieval" in again
