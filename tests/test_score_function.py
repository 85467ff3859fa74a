"""LVPruning's score-function estimator (``estimator="score_function"``; not in the paper)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_fixtures import IMG, inputs, make_batch, make_method, make_model

from lightning_lvp.decision import per_sample_nll, score_function_surrogate


def test_per_sample_nll_is_each_rows_mean():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7), torch.tensor([1, 2, 3, 4, 5])
    rows = torch.tensor([0, 0, 2, 2, 2])
    nll = per_sample_nll(logits, targets, rows, 3)
    tok = F.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(nll, torch.stack([tok[:2].mean(), torch.tensor(0.0), tok[2:].mean()]))


def test_surrogate_gradient_is_leave_one_out_advantage_times_score():
    """d surrogate / d log P(D_ij) = (L_i - mean_{k!=i} L_k) / B for tokens alive before the stage, else 0."""
    vision = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    log_p = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    p_keep = [torch.rand(3, 4, requires_grad=True) for _ in range(2)]
    stage0 = torch.tensor([[0, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float)
    nll = torch.tensor([2.0, 0.5, 1.0])
    surrogate, expected = score_function_surrogate(list(zip(log_p, p_keep)), [stage0, stage0], vision, nll)
    surrogate.backward()
    adv = torch.tensor([2.0 - 0.75, 0.5 - 1.5, 1.0 - 1.25]) / 3
    assert torch.allclose(log_p[0].grad, adv[:, None] * vision.float())
    assert torch.allclose(log_p[1].grad, adv[:, None] * stage0)  # dropped at stage 0: no say at stage 1
    n_vision = vision.float().sum(1)
    assert torch.allclose(expected[:, 0], (p_keep[0] * vision).sum(1) / n_vision)
    assert torch.allclose(expected[:, 1], (p_keep[1] * stage0).sum(1) / n_vision)


def test_decisions_follow_the_hard_gumbel_law_and_are_detached():
    """P(keep) = sigmoid(log-odds) (the law of a hard 2-way Gumbel-max sample at any tau), decisions carry
    no gradient, and the recorded log P is the log-probability of the drawn decision."""
    method = make_method(after_layers=[1], keep_ratios=[0.5], train_ratios=[0.5], estimator="score_function")
    gamma = torch.zeros(1, 4000, 2)
    gamma[0, :, 0] = torch.linspace(-3, 3, 4000)
    gamma.requires_grad_(True)
    alive = torch.ones(1, 4000)
    alive[0, :10] = 0
    torch.manual_seed(0)
    keep = method._sample(gamma, alive, 0)
    assert not keep.requires_grad and torch.all(keep[0, :10] == 0)
    log_p, p = method.sampled[0]
    x = gamma[0, :, 0].detach()
    expect = torch.where(keep[0].bool(), F.logsigmoid(x), F.logsigmoid(-x)) * alive[0]
    assert torch.allclose(log_p[0].detach(), expect)
    # empirical keep rate in bins of log-odds matches sigmoid within sampling error
    for lo in range(10, 4000, 500):
        sel = slice(lo, lo + 500)
        rate, prob = keep[0, sel].mean(), torch.sigmoid(x[sel]).mean()
        assert abs(float(rate - prob)) < 0.08
    # a Gumbel-max draw has the same law: compare the overall keep rates of both samplers
    torch.manual_seed(1)
    gumbel = F.gumbel_softmax(gamma.detach().expand(8, -1, -1), tau=0.3, hard=True)[..., 0]
    assert abs(float(gumbel.mean() - torch.sigmoid(x).mean())) < 0.01


def test_training_step_trains_modules_without_straight_through_gradient():
    """In the masked forward the decisions are detached, so the causal loss alone gives the modules no
    gradient; the surrogate does, and the base stays frozen."""
    torch.manual_seed(0)
    model = make_model(make_method(estimator="score_function")).train()
    batch = make_batch([(3, 4, 2), (1, 6, 3), (2, 5, 2)])
    out = model.forward_train(**inputs(batch), labels=batch["labels"], tau=1.0)
    params = [p for p in model.method.parameters() if p.requires_grad]
    assert not out.loss_causal.requires_grad  # frozen base, detached decisions: no straight-through path
    nll = per_sample_nll(out.logits, out.targets, out.sample_index, 3)
    surrogate, expected = score_function_surrogate(model.method.sampled, out.decisions, batch["input_ids"] == IMG, nll)
    grads = torch.autograd.grad(surrogate + expected.sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert len(model.method.sampled) == 3 and expected.shape == (3, 3)


def test_unknown_estimator_fails_naming_it():
    with pytest.raises(ValueError, match="estimator"):
        make_method(estimator="reinforce")


def test_lvp_module_loss_uses_the_surrogate_and_the_expected_ratio(tmp_path):
    """LVPModule with ``estimator="score_function"``: the training loss reaches the modules (through the
    surrogate and the ratio loss on the EXPECTED kept fractions), the logged kept ratios stay the hard ones,
    and the base gets no gradient."""
    from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava
    from lightning_lvp.training.module import LVPModule

    build_tiny_llava(TinyLlavaSpec()).save_pretrained(tmp_path)
    method = make_method(estimator="score_function", ratio_control=1.0, logit_scale=0.3)
    module = LVPModule(model_path=str(tmp_path), method=method, dtype="float32", optimizer=torch.optim.AdamW)
    module.configure_model()
    module.train()
    batch = make_batch([(3, 4, 2), (1, 6, 3), (2, 5, 2)])
    batch["vision_mask"] = batch["input_ids"] == IMG
    torch.manual_seed(0)
    res = module._losses(batch, "train")
    res["loss"].backward()
    grads = [p.grad for p in module.method.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in module.model.llava.parameters())
    kept = [float(res[f"kept_ratio/{name}"]) for name in module.stage_names]
    n_vision = float(batch["vision_mask"].sum(1)[0])
    assert all(abs(k * n_vision * 3 - round(k * n_vision * 3)) < 1e-4 for k in kept)  # hard counts / N_v
    assert not torch.allclose(res["loss_ratio"], torch.tensor(0.0))
