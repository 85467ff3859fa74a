"""The integral ratio controller of LVPruning (``ratio_control``; not in the paper)."""

from __future__ import annotations

import pytest
import torch
from core_fixtures import inputs, make_batch, make_method, make_model

from lightning_lvp.decision import clip_sample_grads, ratio_loss


def test_control_step_is_gain_times_error():
    method = make_method(ratio_control=0.5)
    method.control_ratios(torch.tensor([0.7, 0.3, 0.0]), torch.tensor([0.5, 0.3, 0.1]))
    assert torch.allclose(method.ratio_bias, torch.tensor([-0.1, 0.0, 0.05]))
    method.control_ratios(torch.tensor([0.7, 0.2, 0.0]), torch.tensor([0.5, 0.3, 0.1]))  # integrates
    assert torch.allclose(method.ratio_bias, torch.tensor([-0.2, 0.05, 0.1]))


def test_off_by_default_and_keys_unchanged():
    """Without the controller the state_dict has no new key, so older pruner folders still load."""
    off, on = make_method(), make_method(ratio_control=1.0)
    off.control_ratios(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 0.3, 0.1]))
    assert torch.equal(off.ratio_bias, torch.zeros(3))
    model_off, model_on = make_model(off), make_model(on)
    assert "ratio_bias" not in model_off.method.state_dict()
    assert "ratio_bias" in model_on.method.state_dict()
    with pytest.raises(ValueError, match="ratio_control"):
        make_method(ratio_control=-1.0)


@pytest.mark.parametrize("bias, expected", [(60.0, 1.0), (-60.0, 0.0)])
def test_bias_moves_training_decisions(bias, expected):
    """A large bias keeps (drops) every alive token in the masked training forward: the bias reaches
    the Gumbel decisions of every stage."""
    torch.manual_seed(0)
    model = make_model(make_method(ratio_control=1.0)).train()
    model.method.ratio_bias.fill_(bias)
    batch = make_batch([(3, 4, 2), (1, 6, 3)])
    out = model.forward_train(**inputs(batch), labels=batch["labels"], tau=1.0)
    assert torch.equal(out.kept, torch.full_like(out.kept, expected))


def test_offset_of_the_modules_does_not_change_decisions():
    """With the controller, decisions depend on the per-sample CENTERED log-odds: shifting every keep
    logit by a constant (what the causal loss would otherwise learn, "keep more of everything") gives
    the same Gumbel decisions for the same noise."""
    model = make_model(make_method(ratio_control=1.0)).train()
    batch = make_batch([(3, 4, 2), (1, 6, 3)])
    torch.manual_seed(1)
    ref = model.forward_train(**inputs(batch), labels=batch["labels"], tau=1.0)
    for module in model.method.decision:
        module.head.bias.data[0] += 5.0  # the keep logit's bias: log-odds + 5 everywhere
    torch.manual_seed(1)
    shifted = model.forward_train(**inputs(batch), labels=batch["labels"], tau=1.0)
    assert torch.equal(ref.kept, shifted.kept)
    for a, b in zip(ref.decisions, shifted.decisions):
        assert torch.equal(a, b)


def test_inference_ignores_bias():
    """Inference keeps the top round(ratio * N) by score within a stage: a per-stage constant cannot
    change which tokens, so a trained bias leaves the pruned forward bitwise unchanged."""
    model = make_model(make_method(ratio_control=1.0)).eval()
    batch = make_batch([(3, 4, 0), (1, 6, 0)])
    with torch.no_grad():
        ref = model.forward_infer(**inputs(batch))
        model.method.ratio_bias.copy_(torch.tensor([3.0, -2.0, 7.0]))
        biased = model.forward_infer(**inputs(batch))
    assert torch.equal(ref.hidden, biased.hidden)
    for a, b in zip(ref.kept_patches, biased.kept_patches):
        assert torch.equal(a, b)


def test_closed_loop_reaches_targets():
    """Stepping the controller with the kept ratios it causes drives them to the targets, from a bias
    that starts by keeping almost every token."""
    torch.manual_seed(0)
    model = make_model(make_method(ratio_control=2.0)).train()
    model.method.ratio_bias.fill_(4.0)
    batch = make_batch([(3, 4, 2), (1, 6, 3), (2, 5, 2), (4, 3, 1)] * 2)
    targets = torch.tensor([0.5, 0.3, 0.1])
    history = []
    for _ in range(80):
        with torch.no_grad():
            out = model.forward_train(**inputs(batch), labels=batch["labels"], tau=1.0)
        model.method.control_ratios(out.kept.mean(0), targets)
        history.append(out.kept.mean(0))
    late = torch.stack(history[-40:]).mean(0)
    assert torch.allclose(late, targets, atol=0.03), late
    assert ratio_loss(history[0][None], targets) > 0.1  # started far off: ~0.95 kept at every stage


def test_clip_sample_grads_caps_outlier_samples():
    """Backward of clip_sample_grads: per-sample gradient norms above the batch quantile are scaled
    down to it, the others pass unchanged; forward is the identity."""
    x = torch.zeros(4, 3, requires_grad=True)
    weights = torch.tensor(
        [[3.0, 4.0, 0.0], [0.0, 0.6, 0.8], [0.3, 0.4, 0.0], [60.0, 80.0, 0.0]]
    )  # norms 5, 1, .5, 100
    y = clip_sample_grads(x, 0.5)
    assert torch.equal(y, x)
    (y * weights).sum().backward()
    cap = torch.quantile(torch.tensor([5.0, 1.0, 0.5, 100.0]), 0.5)  # 3.0
    expected = torch.stack([weights[0] * cap / 5, weights[1], weights[2], weights[3] * cap / 100])
    assert torch.allclose(x.grad, expected)
    with pytest.raises(ValueError, match="grad_clip_quantile"):
        make_method(grad_clip_quantile=0.0)


def test_logit_bound_limits_the_centered_log_odds():
    method = make_method(ratio_control=1.0, logit_bound=2.0)
    gamma = torch.zeros(1, 5, 2)
    gamma[0, :, 0] = torch.tensor([-40.0, 0.0, 1.0, 40.0, 7.0])
    alive = torch.tensor([[True, True, True, True, False]])
    keep = method._controlled(gamma, alive, 0)[..., 0]
    centered = torch.tensor([-40.25, -0.25, 0.75, 39.75, 0.0])  # mean over the 4 alive = 0.25; dead -> 0
    assert torch.allclose(keep, 2.0 * torch.tanh(centered / 2.0))
    assert keep.abs().max() <= 2.0
    with pytest.raises(ValueError, match="logit_bound"):
        make_method(logit_bound=0.0)


def test_logit_scale_standardizes_the_training_log_odds():
    """``logit_scale``: the training decisions are drawn from per-sample z-scores of the log-odds times the
    scale (plus the bias): their std over the alive tokens is the scale, and multiplying the modules'
    log-odds by any positive factor changes nothing."""
    method = make_method(ratio_control=1.0, logit_scale=0.3)
    torch.manual_seed(0)
    gamma = torch.randn(2, 9, 2)
    alive = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float)
    method.ratio_bias.fill_(0.25)
    out = method._controlled(gamma, alive, 0)[..., 0]
    for row, a in zip(out, alive.bool()):
        z = row[a] - 0.25
        assert torch.allclose(z.mean(), torch.tensor(0.0), atol=1e-6)
        assert torch.allclose(z.pow(2).mean().sqrt(), torch.tensor(0.3), atol=1e-5)
    assert torch.allclose(method._controlled(gamma * 7.0, alive, 0)[..., 0][alive.bool()], out[alive.bool()], atol=1e-5)
    with pytest.raises(ValueError, match="logit_scale"):
        make_method(ratio_control=1.0, logit_scale=0.0)
