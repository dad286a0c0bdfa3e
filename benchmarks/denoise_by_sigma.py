"""One-step denoising quality of text-to-image bases, by noise level: how well each reads x0.

For held-out Shape World scenes and their captions, noise each scene to sigma, run the transformer
once, read x0 from its output as the base's scheduler says (velocity, sample or EDM-preconditioned;
see x2edit/schedulers.py) and report PSNR(x0_hat, x0) in dB next to PSNR(x_sigma, x0). Bases with
different prediction types trained alike are compared on the same scenes and noise.

``--sample-steps N`` also writes OUT/<base>_samples.png: each scene beside what the base draws from its
caption in N steps, the check that a frozen base can render the domain an adapter is to edit.

    python benchmarks/denoise_by_sigma.py --bases runs/base_flow/pipeline runs/base_edm/pipeline \\
        --out runs/denoise
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for values in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


@torch.no_grad()
def denoise_table(pipe, sigmas: list[float], n: int = 16, seed: int = 0) -> dict:
    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.schedulers import predicted_sample, prediction_type, sigma_data_of
    from x2edit.training.losses import flow_matching_pair

    kind = prediction_type(pipe.scheduler)
    scenes = [ShapeWorld(64).sample(i, None, "eval") for i in range(n)]
    x = torch.from_numpy(np.stack([s.target for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = pipe._encode_vae_image(x, generator=None)  # (B, C, h, w)
    b, c, h, w = z.shape
    x0 = pipe._pack_latents(z, b, c, h, w)  # (B, T, 4C)
    ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x0.dtype)
    text, pooled, text_ids = pipe.encode_prompt([s.captions[1] for s in scenes], device="cpu",
                                                max_sequence_length=pipe.tokenizer.model_max_length)
    rows = {}
    for sigma in sigmas:
        s = torch.full((b,), sigma)
        xt, _ = flow_matching_pair(x0, s, generator=torch.Generator().manual_seed(seed))
        out = pipe.transformer(hidden_states=xt, timestep=s, pooled_projections=pooled, encoder_hidden_states=text,
                               txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        x0_hat = predicted_sample(out, xt, s, kind, sigma_data_of(pipe.scheduler))
        rows[str(sigma)] = {"input_db": psnr(xt, x0), "x0_hat_db": psnr(x0_hat, x0)}
    return {"prediction_type": kind, "by_sigma": rows}


@torch.no_grad()
def sample_grid(pipe, n: int, steps: int, seed: int = 0, scale: int = 2):
    """PIL image, one row per held-out scene: the scene | the base's text-to-image sample of its caption."""
    from PIL import Image

    from x2edit.data_pipeline.shapeworld import ShapeWorld

    pipe.set_progress_bar_config(disable=True)
    scenes = [ShapeWorld(64).sample(i, None, "eval") for i in range(n)]
    h, w = scenes[0].target.shape[:2]
    drawn = pipe(prompt=[s.captions[1] for s in scenes], height=h, width=w, num_inference_steps=steps,
                 output_type="np", generator=torch.Generator().manual_seed(seed)).images  # (n, h, w, 3) in [0, 1]
    drawn = (np.clip(drawn, 0, 1) * 255).round().astype(np.uint8)
    rows = np.concatenate([np.concatenate([s.target, d], 1) for s, d in zip(scenes, drawn)], 0)
    return Image.fromarray(rows).resize((rows.shape[1] * scale, rows.shape[0] * scale), Image.NEAREST)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", nargs="+", required=True, help="saved text-to-image pipeline directories")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.2, 0.5, 0.8])
    ap.add_argument("--n", type=int, default=16, help="held-out scenes")
    ap.add_argument("--sample-steps", type=int, default=0,
                    help="also write each base's text-to-image samples beside (at most 8 of) the scenes (0: off)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from x2edit.registry import load_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for base in args.bases:
        pipe = load_pipeline(base)  # once per base: FLUX-size bases take a while to load
        results[base] = denoise_table(pipe, args.sigmas, args.n)
        if args.sample_steps:
            sample_grid(pipe, min(args.n, 8), args.sample_steps).save(out / f"{Path(base).parent.name}_samples.png")
    (out / "denoise_by_sigma.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    first = next(iter(results.values()))["by_sigma"]
    lines = [f"PSNR (dB) of the one-step x0 estimate on {args.n} held-out Shape World scenes.", "",
             "| sigma | noisy input | " + " | ".join(f"{Path(b).parent.name} ({r['prediction_type']})"
                                                     for b, r in results.items()) + " |",
             "|---:|---:|" + "---:|" * len(results)]
    for sigma in map(str, args.sigmas):
        lines.append(f"| {sigma} | {first[sigma]['input_db']:.2f} | " + " | ".join(
            f"{r['by_sigma'][sigma]['x0_hat_db']:.2f}" for r in results.values()) + " |")
    (out / "denoise_by_sigma.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
