"""Fixtures of the app tests: one launched app on the embedded x2edit-tiny for the whole session (the
handler, client and browser tests share it), a tiny LoRA index for x2edit-tiny, small images.

The LoRA index is built with the real ``x2edit.retrieval.index.build_index`` from three small LoRA files on
x2edit-tiny's modules, embedded by an untrained weight encoder made from x2edit-tiny's module set: the
ranking means nothing, but every search runs the real code on a real index.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit.registry import resolve_base

if importlib.util.find_spec("gradio") is None:  # the app extra is not installed
    if os.environ.get("CI") == "true":
        raise RuntimeError("the app tests need the app extra, which CI installs: pip install -e '.[dev,app]'")
    collect_ignore_glob = ["test_app_*.py"]

APP_MAX_FILE_SIZE = "100kb"  # small, so the oversized-upload tests stay cheap
APP_QUEUE_SIZE = 2
LORA_TITLES = ("night tone", "red background", "striped fill")


def lora_factors(modules: dict[str, tuple[int, int]], seed: int, rank: int = 2, std: float = 0.5) -> dict:
    """{module: (A (r, in), B (out, r), scale)}, random and non-zero (a zero LoRA would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, k, generator=g) * std, torch.randn(n, rank, generator=g) * std, 1.0)
            for m, (k, n) in modules.items()}


@pytest.fixture(scope="session")
def lora_index(tmp_path_factory) -> Path:
    """An index of three LoRAs for x2edit-tiny (titles ``LORA_TITLES``)."""
    from diffusers import FluxTransformer2DModel

    from x2edit.retrieval.encoder import EncoderConfig, WeightEncoder, module_set
    from x2edit.retrieval.formats import write_lora
    from x2edit.retrieval.index import build_index

    root = tmp_path_factory.mktemp("app_loras")
    source, _ = resolve_base("x2edit-tiny")
    config = json.loads((Path(source) / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    modules = module_set(FluxTransformer2DModel.from_config(config))
    encoder = WeightEncoder(EncoderConfig(modules=[list(m) for m in modules], dim=16, layers=1, heads=2))
    encoder.save(root / "encoder.safetensors")
    shapes = {name: (k, n) for name, k, n in modules}
    targets = {m: shapes[m] for m in ("x_embedder", "proj_out", "transformer_blocks.0.attn.to_q")}
    for i, title in enumerate(LORA_TITLES):
        write_lora(root / "loras" / f"lora_{i}.safetensors", lora_factors(targets, seed=i), "peft",
                   {"modelspec.title": title})
    build_index(root / "loras", root / "index.parquet", root / "encoder.safetensors")
    return root / "index.parquet"


@pytest.fixture(scope="session")
def served(lora_index, tmp_path_factory):
    """(demo, editor, url): the app as ``x2edit app`` serves it, on x2edit-tiny, for the whole session."""
    from x2edit.app.handlers import AppConfig
    from x2edit.app.ui import launch

    config = AppConfig(lora_index=str(lora_index), output_dir=str(tmp_path_factory.mktemp("app_out")),
                       max_file_size=APP_MAX_FILE_SIZE, queue_size=APP_QUEUE_SIZE)
    demo, editor = launch(config, block=False)
    yield demo, editor, demo.local_url
    demo.close()


@pytest.fixture(scope="session")
def editor(served):
    return served[1]


@pytest.fixture(scope="session")
def client(served):
    from gradio_client import Client

    return Client(served[2], verbose=False)


@pytest.fixture(scope="session")
def example(editor) -> str:
    """A Shape World example the app rendered (64x64 PNG in the app's folder)."""
    return str(sorted((editor.output_dir / "examples").glob("color_change_*.png"))[0])


@pytest.fixture
def corrupt_png(tmp_path) -> Path:
    """A file named .png that holds no image."""
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 8)
    return path


@pytest.fixture
def noise_png(tmp_path) -> Path:
    """A 200x200 noise PNG (~120 KB: over the test app's 100 KB upload limit)."""
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(path)
    return path
