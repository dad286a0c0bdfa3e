"""benchmarks/denoise_by_sigma.py in small (tiny bases, CPU)."""

import json

import pytest
import torch

from x2edit.training.config import config_from_dict
from x2edit.training.trainer import Trainer

TINY = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
        "axes_dims_rope": [4, 6, 6]}


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    """Two tiny bases, one per reading of the output, each trained for 2 steps."""
    tmp = tmp_path_factory.mktemp("bases")
    bases = []
    for kind in ("flow", "edm"):
        cfg = config_from_dict({"mode": "t2i", "output_dir": str(tmp / kind), "steps": 2, "batch_size": 2,
                                "checkpoint_every": 0, "validate_every": 0, "log_every": 0,
                                "data": {"resolution": 32}, "model": {"transformer": TINY, "max_text_tokens": 16,
                                                                      "prediction_type": kind}})
        bases.append(str(Trainer(cfg).train() / "pipeline"))
    return bases


def test_denoise_by_sigma_writes_a_row_per_sigma_and_base(tiny_bases, tmp_path):
    from benchmarks.denoise_by_sigma import main

    assert main(["--bases", *tiny_bases, "--sigmas", "0.1", "0.9", "--n", "2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "denoise_by_sigma.json").read_text())["results"]
    assert [r["prediction_type"] for r in results.values()] == ["flow", "edm"]
    for r in results.values():
        rows = r["by_sigma"]
        assert rows["0.1"]["input_db"] > rows["0.9"]["input_db"]  # more noise, lower input PSNR
        assert all(row["x0_hat_db"] == row["x0_hat_db"] for row in rows.values())  # not NaN
    table = (tmp_path / "denoise_by_sigma.md").read_text()
    assert "| 0.1 |" in table and "(edm)" in table


@pytest.mark.parametrize("kind", ["flow", "edm"])
def test_denoise_by_sigma_reads_each_output_as_its_base_says(tiny_bases, tmp_path, monkeypatch, kind):
    """A transformer that outputs the exact F for its reading gives a near-perfect x0 estimate."""
    import diffusers
    import torch

    import x2edit.training.losses as losses
    from benchmarks.denoise_by_sigma import denoise_table
    from x2edit.schedulers import edm_coefficients

    captured, real_pair = {}, losses.flow_matching_pair

    def pair(x0, sigmas, noise=None, generator=None):
        noise = torch.randn(x0.shape, generator=generator)
        captured.update(x0=x0, noise=noise, sigma=sigmas.view(-1, 1, 1))
        return real_pair(x0, sigmas, noise=noise)

    def exact(self, hidden_states, **kw):
        x0, noise, s = captured["x0"], captured["noise"], captured["sigma"]
        if kind == "flow":
            return (noise - x0,)
        c_skip, c_out = edm_coefficients(s, 0.5)
        return ((x0 - c_skip * hidden_states) / c_out,)

    monkeypatch.setattr(losses, "flow_matching_pair", pair)
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "forward", exact)
    from x2edit.registry import load_pipeline

    base = tiny_bases[["flow", "edm"].index(kind)]
    rows = denoise_table(load_pipeline(base), [0.2, 0.8], n=2)["by_sigma"]
    assert all(row["x0_hat_db"] > 80 for row in rows.values())  # exact up to float32 rounding


def test_sample_steps_writes_scenes_beside_the_bases_samples(tiny_bases, tmp_path):
    import numpy as np
    from PIL import Image

    from benchmarks.denoise_by_sigma import main

    main(["--bases", tiny_bases[0], "--sigmas", "0.5", "--n", "3", "--sample-steps", "2", "--out", str(tmp_path)])
    grid = np.asarray(Image.open(tmp_path / "flow_samples.png"))
    assert grid.shape == (3 * 64 * 2, 2 * 64 * 2, 3)  # 3 scenes, scene | sample, upscaled 2x
    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.registry import load_pipeline

    scenes = [ShapeWorld(64).sample(i, None, "eval") for i in range(3)]
    np.testing.assert_array_equal(grid[::2, :128:2], np.concatenate([s.target for s in scenes]))  # left: the scenes
    pipe = load_pipeline(tiny_bases[0])
    drawn = pipe(prompt=[s.captions[1] for s in scenes], height=64, width=64, num_inference_steps=2,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    drawn = (np.clip(drawn, 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(grid[::2, 128::2], np.concatenate(drawn))  # right: the base's drawing of each caption
