import math

import pytest
import torch

from x2edit.testing import tiny_flux_transformer
from x2edit.training.losses import (
    BlockOutputs,
    contrastive_loss,
    flow_matching_loss,
    flow_matching_pair,
    sample_sigmas,
    source_start_pair,
    x0_error,
)


def _reference_contrastive(z, tasks, T):
    """Loop form of the X2Edit loss, from the definition."""
    z = torch.nn.functional.normalize(z.flatten(1).double(), dim=-1)
    losses = []
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i]
        pos = [j for j in others if tasks[j] == tasks[i]]
        if not pos:
            continue
        e = {j: math.exp(-float(((z[i] - z[j]) ** 2).sum()) / T) for j in others}
        losses.append(-math.log(sum(e[j] for j in pos) / sum(e.values())))
    return sum(losses) / len(losses)


def test_contrastive_matches_loop_reference_and_skips_lonely_anchors():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 5, 4, generator=g)
    tasks = torch.tensor([0, 0, 1, 1, 1, 7])  # task 7 has no partner: skipped, not a constant ~18
    loss = contrastive_loss(feats, tasks, temperature=0.5, gather=False)
    assert loss.item() == pytest.approx(_reference_contrastive(feats, tasks.tolist(), 0.5), rel=1e-5)
    assert contrastive_loss(feats, torch.arange(6), gather=False) is None


def test_contrastive_pulls_same_task_together():
    torch.manual_seed(0)
    feats = torch.randn(8, 3, 4, requires_grad=True)
    tasks = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    opt = torch.optim.SGD([feats], lr=0.5)
    first = contrastive_loss(feats, tasks, gather=False).item()
    for _ in range(50):
        opt.zero_grad()
        contrastive_loss(feats, tasks, gather=False).backward()
        opt.step()
    assert contrastive_loss(feats, tasks, gather=False).item() < 0.5 * first


def test_mean_pooling_option():
    feats = torch.randn(4, 6, 3)
    tasks = torch.tensor([1, 1, 2, 2])
    pooled = contrastive_loss(feats, tasks, pool="mean", gather=False)
    assert pooled.item() == pytest.approx(_reference_contrastive(feats.mean(1), tasks.tolist(), 0.5), rel=1e-5)


def test_flow_matching_pair_and_loss():
    x0 = torch.randn(3, 4, 5)
    noise = torch.randn(3, 4, 5)
    s = torch.tensor([0.0, 0.5, 1.0])
    xt, v = flow_matching_pair(x0, s, noise)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.5 * (x0[1] + noise[1]))
    torch.testing.assert_close(v, noise - x0)
    # Euler step along the true velocity from sigma=0.5 to 0 recovers x0.
    torch.testing.assert_close(xt[1] - 0.5 * v[1], x0[1])
    assert flow_matching_loss(v, v, s).item() == 0
    assert flow_matching_loss(v + 1, v, s).item() == pytest.approx(1.0)


def test_sigma_sampling_schemes_and_shift():
    g = torch.Generator().manual_seed(0)
    plain = sample_sigmas(4000, "logit_normal", generator=g)
    g = torch.Generator().manual_seed(0)
    shifted = sample_sigmas(4000, "logit_normal", shift=3.0, generator=g)
    assert 0 < plain.min() and plain.max() < 1
    assert abs(plain.median().item() - 0.5) < 0.03  # logit-normal(0, 1) is centred on 0.5
    assert shifted.median() > 0.7  # shift > 1 moves mass toward noise
    assert (shifted >= plain).all()


def test_block_outputs_hook_collects_image_stream():
    model = tiny_flux_transformer(0, num_layers=2)
    kw = dict(hidden_states=torch.randn(2, 16, 16), encoder_hidden_states=torch.randn(2, 8, 32),
              pooled_projections=torch.randn(2, 32), timestep=torch.full((2,), 0.5),
              guidance=torch.full((2,), 3.5), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    with BlockOutputs(model) as rec:
        model(**kw)
    assert [o.shape for o in rec.outputs] == [torch.Size([2, 16, 32])] * 2
    with BlockOutputs(model, blocks=[-1]) as rec:
        model(**kw)
    assert len(rec.outputs) == 1
    model(**kw)
    assert len(rec.outputs) == 1  # hooks removed on exit


def test_source_start_pair_lands_on_the_target_in_one_euler_step():
    g = torch.Generator().manual_seed(0)
    x0, source = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    xt, v = source_start_pair(x0, source, 0.3)
    assert xt is source
    torch.testing.assert_close(xt + (0 - 0.3) * v, x0)


def test_x0_error_relative_to_the_edit():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 6, generator=g)
    source = x0 + torch.tensor([0.1, 1.0, 3.0]).view(3, 1, 1) * torch.randn(3, 4, 6, generator=g)
    assert x0_error(source, x0, source).item() == pytest.approx(1.0)  # the source itself: 0 dB on every pair
    assert x0_error(x0, x0, source).item() == 0
    # half-way to the target: each pair's error is a quarter of its own edit's, whatever the edit's size
    assert x0_error((source + x0) / 2, x0, source).item() == pytest.approx(0.25)
    # without a source: the plain MSE
    assert x0_error(source, x0).item() == pytest.approx(((source - x0) ** 2).mean().item())
    # an unchanged pair is weighted by the floor, not by 1/0
    assert torch.isfinite(x0_error(x0 + 1, x0, x0))


def test_contrastive_keeps_one_float32_copy_of_the_features_for_backward():
    """bf16 block features (as in real training): autograd keeps one float32 copy, not normalised copies too."""
    feats = torch.randn(4, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    tasks = torch.tensor([0, 0, 1, 1])
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = contrastive_loss(feats, tasks, gather=False)
    one_copy = feats.numel() * 4
    assert one_copy <= sum(saved.values()) < 1.2 * one_copy
    reference = _reference_contrastive(feats.detach().float(), tasks.tolist(), 0.5)
    assert loss.item() == pytest.approx(reference, rel=1e-4)
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
