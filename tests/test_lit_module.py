"""Exact values of the training schedules in lightning_lvp/training/module.py: LR multiplier and Gumbel temperature."""

import types
from types import SimpleNamespace

import pytest

from lightning_lvp.training.module import LVPModule, warmup_cosine


def test_warmup_is_linear_then_cosine_to_zero():
    assert [warmup_cosine(s, 110, 10, "cosine") for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert warmup_cosine(10, 110, 10, "cosine") == 1.0  # cosine starts at 1 right after warm-up
    assert warmup_cosine(60, 110, 10, "cosine") == pytest.approx(0.5)  # half-way: (1 + cos(pi / 2)) / 2
    assert warmup_cosine(85, 110, 10, "cosine") == pytest.approx(0.5 * (1 + (-(2**0.5) / 2)))  # 3/4: cos(3 pi / 4)
    assert warmup_cosine(110, 110, 10, "cosine") == pytest.approx(0.0)
    assert warmup_cosine(500, 110, 10, "cosine") == pytest.approx(0.0)  # past the end: stays at 0


def test_constant_schedule_and_no_warmup():
    assert [warmup_cosine(s, 100, 4, "constant") for s in (0, 3, 4, 99)] == [0.25, 1.0, 1.0, 1.0]
    assert warmup_cosine(0, 100, 0, "cosine") == 1.0


def _bind(ns: SimpleNamespace) -> SimpleNamespace:
    ns._fit_steps = types.MethodType(LVPModule._fit_steps, ns)
    return ns


def _module(tau, tau_final, step, total, with_trainer=True, fn="fit"):
    trainer = SimpleNamespace(estimated_stepping_batches=total, state=SimpleNamespace(fn=fn)) if with_trainer else None
    hparams = SimpleNamespace(tau=tau, tau_final=tau_final)
    return _bind(SimpleNamespace(hparams=hparams, _trainer=trainer, trainer=trainer, global_step=step))


def test_current_tau_is_linear_from_tau_to_tau_final():
    assert LVPModule.current_tau(_module(1.0, 0.2, 0, 100)) == 1.0
    assert LVPModule.current_tau(_module(1.0, 0.2, 25, 100)) == pytest.approx(0.8)
    assert LVPModule.current_tau(_module(1.0, 0.2, 100, 100)) == pytest.approx(0.2)
    assert LVPModule.current_tau(_module(1.0, 0.2, 150, 100)) == pytest.approx(0.2)  # clamped after the end


def test_current_tau_constant_without_tau_final_or_trainer():
    assert LVPModule.current_tau(_module(0.7, None, 50, 100)) == 0.7
    assert LVPModule.current_tau(_module(1.0, 0.2, 50, 100, with_trainer=False)) == 1.0


def test_ratio_targets_anneal_linearly_from_one_then_hold():
    def module(step, anneal, total=100, start=1.0, fn="fit"):
        trainer = SimpleNamespace(estimated_stepping_batches=total, state=SimpleNamespace(fn=fn))
        hparams = SimpleNamespace(ratio_anneal=anneal, ratio_anneal_start=start)
        return _bind(SimpleNamespace(hparams=hparams, _trainer=trainer, trainer=trainer,
                                     global_step=step, method=SimpleNamespace(train_ratios=[0.5, 0.1])))  # fmt: skip

    assert LVPModule.current_ratio_targets(module(0, 0.5)) == [1.0, 1.0]
    assert LVPModule.current_ratio_targets(module(25, 0.5)) == pytest.approx([0.75, 0.55])
    assert LVPModule.current_ratio_targets(module(50, 0.5)) == pytest.approx([0.5, 0.1])
    assert LVPModule.current_ratio_targets(module(90, 0.5)) == pytest.approx([0.5, 0.1])
    assert LVPModule.current_ratio_targets(module(0, 0.0)) == [0.5, 0.1]  # the paper: targets from step 0
    # from ratio_anneal_start: a target above the start holds, the others start there
    assert LVPModule.current_ratio_targets(module(0, 0.5, start=0.5)) == [0.5, 0.5]
    assert LVPModule.current_ratio_targets(module(25, 0.5, start=0.5)) == pytest.approx([0.5, 0.3])
    assert LVPModule.current_ratio_targets(module(60, 0.5, start=0.5)) == pytest.approx([0.5, 0.1])
    # `validate` / `test` alone have no step budget (estimated_stepping_batches raises there): final values
    assert LVPModule.current_ratio_targets(module(0, 0.5, fn="validate")) == [0.5, 0.1]


def test_current_tau_outside_fit_is_the_final_value():
    assert LVPModule.current_tau(_module(1.0, 0.2, 0, 100, fn="validate")) == pytest.approx(0.2)
