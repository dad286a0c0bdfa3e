"""Training objectives: FLUX flow matching and X2Edit's contrastive loss on internal representations.

The router balance loss is produced by the MoE layers themselves (``RoutingState.balance_loss``);
the trainer weights and adds it.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

# -- flow matching ---------------------------------------------------------------------------


def sample_sigmas(batch: int, scheme: str = "logit_normal", shift: float = 1.0, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) noise levels sigma in (0, 1) for rectified-flow training.

    u is drawn by SD3/FLUX's density (``scheme``: "logit_normal", "mode" or "uniform", via diffusers),
    then shifted toward noise as FLUX's scheduler does: sigma = shift*u / (1 + (shift-1)*u).
    """
    u = compute_density_for_timestep_sampling(scheme if scheme != "uniform" else "none", batch, logit_mean,
                                              logit_std, mode_scale, device="cpu", generator=generator)
    sigma = shift * u / (1 + (shift - 1) * u)
    return sigma.clamp(1e-4, 1 - 1e-4).to(device)


def flow_matching_pair(x0: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input and velocity target for clean latents ``x0`` (B, ...).

    x_sigma = (1 - sigma) x0 + sigma * noise; the model predicts v = noise - x0 (FLUX convention,
    which the pipeline's Euler scheduler integrates from sigma=1 to 0).
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def source_start_pair(x0: torch.Tensor, source: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and velocity target of a one-step edit from the source (``AdapterConfig.source_start``).

    The source tokens (B, T, C) are the sample at noise level ``sigma``: x_sigma = source, i.e. the
    noise (source - (1 - sigma) x0) / sigma on the rectified-flow path to the target x0, whose
    velocity target noise - x0 is (source - x0) / sigma. One Euler step from sigma to 0 with that
    velocity lands on x0.
    """
    return source, (source - x0) / sigma


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor,
                       weighting: str = "none") -> torch.Tensor:
    """Mean squared error between predicted and target velocity, weighted per sample (SD3 schemes)."""
    w = compute_loss_weighting_for_sd3(weighting, sigmas.float()).view(-1, *([1] * (pred.dim() - 1)))
    return (w * (pred.float() - target.float()) ** 2).mean()


# Floor on a pair's edit energy mean((source - target)^2) in latent units, so an unchanged pair (a
# no-op instruction, or a colour swapped for a near twin) does not outweigh a batch: about a 3% rms change
# of the whole image in [-1, 1] units (x2edit-tiny: median edit energies run from 0.004 to 0.7).
EDIT_ENERGY_FLOOR = 1e-3


def x0_error(x0_hat: torch.Tensor, x0: torch.Tensor, source: torch.Tensor | None = None,
             token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the predicted clean latents (B, T, C), optionally relative to the edit.

    With ``source`` (the edit's input on the same grid) each pair's error is divided by its edit
    energy mean((source - x0)^2): the loss is then the mean over pairs of MSE(output, target) /
    MSE(source, target) = 10^(-edit gain / 10), 1.0 for an output equal to the source. Each pair
    counts as it does in the edit-gain metric, whatever the area it changes; the plain MSE lets
    the large edits (backgrounds, styles) dominate and leaves the small ones with errors outside
    their region that cost them decibels (measured in the README). ``token_weight`` (B, T) weighs each
    token's error (e.g. more inside the edited region); each row's weights are normalised to mean 1.
    """
    err = (x0_hat.float() - x0.float()) ** 2  # (B, T, C)
    if token_weight is not None:
        w = token_weight.float().to(err.device)
        err = err * (w / w.mean(1, keepdim=True))[..., None]
    err = err.flatten(1).mean(1)  # (B,)
    if source is not None:
        err = err / ((source.float() - x0.float()) ** 2).flatten(1).mean(1).clamp(min=EDIT_ENERGY_FLOOR)
    return err.mean()


# -- where the edit is -----------------------------------------------------------------------

# A pixel counts as changed when a channel moves by more than this (of 255): above rendering and
# resampling noise, below any edit Shape World makes.
CHANGED_PIXEL = 8


def changed_fraction(sources: list, targets: list, patch: int) -> torch.Tensor:
    """(B, T) fraction of each token's ``patch`` x ``patch`` pixels that the edit changes, tokens in the
    row-major order of the packed latents.

    Args:
        sources, targets: (H, W, 3) uint8 images, H and W multiples of ``patch``.
        patch: pixels per token side (the VAE factor x 2 of FLUX's 2x2 packing).
    """
    import numpy as np

    diff = np.abs(np.stack(sources).astype(np.int16) - np.stack(targets).astype(np.int16)).max(-1)  # (B, H, W)
    changed = torch.from_numpy(diff > CHANGED_PIXEL).float()[:, None]
    return torch.nn.functional.avg_pool2d(changed, patch).flatten(1)  # (B, H/patch * W/patch)


def mask_loss(logits: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a per-token edit-region prediction (B, T) against the changed fraction."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, fraction.to(logits.device))


# -- contrastive loss on internal representations --------------------------------------------


def _gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows, this process's keeping its gradient; returns (all rows, offset of ours)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = z
    return torch.cat(parts), rank * z.shape[0]


def contrastive_loss(features: torch.Tensor, task_ids: torch.Tensor, temperature: float = 0.5,
                     pool: str = "flatten", gather: bool = True) -> torch.Tensor | None:
    """X2Edit's supervised contrastive loss over one block's hidden states.

    Args:
        features: (B, T, C) hidden states of one block for this process's batch.
        task_ids: (B,) task id of each sample; positives are other samples of the same task.
        temperature: T in exp(-d^2 / T).
        pool: "flatten" (X2Edit: the whole (T*C) map per sample) or "mean" (mean over tokens).
        gather: compare against the samples of all processes (if torch.distributed is running).
    Returns the mean over anchors that have at least one positive of
        -log( sum_pos exp(-d^2/T) / sum_{j != i} exp(-d^2/T) ),  d = || z_i - z_j ||, z unit-norm;
    or None when no anchor has a positive (such anchors only add a constant: X2Edit's pitfall).
    """
    # (B, D) in float32, the one copy of the features autograd keeps: the cosines come from the Gram
    # matrix of the raw rows over their norms, not from normalised copies (at FLUX size, batch 4, a
    # flattened block is 4 x 4096 x 3072 floats: each copy of 19 blocks costs 3.6 GB).
    z = (features.flatten(1) if pool == "flatten" else features.mean(1)).float()
    if gather:
        all_z, offset = _gather_with_grad(z)
        all_tasks, _ = _gather_with_grad(task_ids.to(z.device))
    else:
        all_z, offset, all_tasks = z, 0, task_ids.to(z.device)
    anchors = torch.arange(offset, offset + z.shape[0], device=z.device)
    norms = all_z.norm(dim=1).clamp(min=1e-12)  # (N,)
    cos = (z @ all_z.T) / (norms[offset: offset + z.shape[0], None] * norms[None, :])  # (B, N)
    d2 = (2 - 2 * cos).clamp(min=0)  # squared distances of the unit vectors
    logits = -d2 / temperature
    not_self = torch.ones_like(logits, dtype=torch.bool)
    not_self[torch.arange(z.shape[0]), anchors] = False
    positive = (task_ids.to(z.device)[:, None] == all_tasks[None, :]) & not_self
    valid = positive.any(1)
    if not valid.any():
        return None
    log_all = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (log_all - log_pos)[valid].mean()


class BlockOutputs:
    """Collects the target tokens' outputs of chosen FLUX double blocks during a forward pass.

    ``FluxTransformerBlock.forward`` returns (encoder_hidden_states, hidden_states); the second is the
    image stream (B, T_img, C), which in edit training is ``cat([noisy target, reference])``. As
    X2Edit, only the first ``num_tokens`` (the target's) are kept: the reference tokens are the
    source image, whose features would pull same-task pairs together by their sources' content.
    Use as a context manager around the forward; ``outputs`` then holds one (B, num_tokens, C)
    tensor per block, in block order.

    Args:
        transformer: a FluxTransformer2DModel.
        blocks: "all" or indices of double blocks.
        num_tokens: target tokens at the head of the image stream (None: the whole stream).
    """

    def __init__(self, transformer, blocks: str | list[int] = "all", num_tokens: int | None = None):
        n = len(transformer.transformer_blocks)
        self.indices = list(range(n)) if blocks == "all" else [i % n for i in blocks]
        self.transformer, self.outputs, self._handles = transformer, [], []
        self.num_tokens = num_tokens

    def _hook(self, module, args, output):
        self.outputs.append(output[1][:, : self.num_tokens])

    def __enter__(self):
        self.outputs = []
        self._handles = [self.transformer.transformer_blocks[i].register_forward_hook(self._hook)
                         for i in self.indices]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
