"""The one schedule rule and syntax (lightning_lvp/schedules.py), on exact values."""

import pytest

from lightning_lvp import schedules as S


def test_paper_rule_and_its_one_clip_policy():
    assert S.paper_schedule(0.5, 3) == [0.5, 0.3, 0.1]
    assert S.paper_schedule(0.45, 3) == [0.45, 0.25, 0.05]  # reaches the floor exactly
    assert S.paper_schedule(0.3, 3) == [0.3, 0.1, 0.05]  # 0.3 - 0.4 < 0: floored at MIN_RATIO
    assert S.paper_schedule(0.6, 2) == [0.6, 0.4]
    assert S.paper_schedule(0.6, 0) == []
    assert S.paper_schedule(0.5, 3, step=0.1, min_ratio=0.35) == [0.5, 0.4, 0.35]
    for bad in (0.0, -0.1, 1.2):
        with pytest.raises(ValueError, match="rho must be in"):
            S.paper_schedule(bad, 3)


def test_parse_rhos():
    assert S.parse_rhos("0.5") == [0.5]
    assert S.parse_rhos("0.6,0.5,0.45") == [0.6, 0.5, 0.45]
    assert S.parse_rhos("0.3:0.4:0.05") == [0.3, 0.35, 0.4]
    for bad in ("0.4:0.3:0.05", "0.3:0.4", "0.3:0.4:0", "", "a"):
        with pytest.raises(ValueError):
            S.parse_rhos(bad)


def test_parse_schedules_every_form():
    assert S.parse_schedules("0.5,0.3,0.1") == [[0.5, 0.3, 0.1]]
    assert S.parse_schedules("[0.5, 0.3, 0.1]", 3) == [[0.5, 0.3, 0.1]]  # printed form pastes back
    assert S.parse_schedules("paper:0.5", 3) == [[0.5, 0.3, 0.1]]
    assert S.parse_schedules("paper:0.6,0.5", 2) == [[0.6, 0.4], [0.5, 0.3]]
    assert S.parse_schedules("paper:0.3:0.4:0.1", 3) == [[0.3, 0.1, 0.05], [0.4, 0.2, 0.05]]
    assert S.parse_schedules("base;paper:0.5;0.6,0.4,0.2", 3) == [None, [0.5, 0.3, 0.1], [0.6, 0.4, 0.2]]
    assert S.parse_schedules("auto,0.5") == [[None, 0.5]]  # the method decides stage 1
    assert S.parse_schedule("0.5,0.3") == [0.5, 0.3]
    assert S.parse_schedule("base") is None


@pytest.mark.parametrize(
    ("spec", "stages", "match"),
    [
        ("0.5,0.3", 3, "has 2 ratios, the method has 3 stages"),
        ("0.3,0.5,0.1", 3, "non-increasing"),
        ("0.5,0.3,0", 3, r"in \(0, 1\]"),
        ("paper:0.5", None, "stage count"),
        ("rho0.5", 3, "cannot read schedule"),
        ("", 3, "no schedule"),
    ],
)
def test_parse_schedules_errors_name_the_problem(spec, stages, match):
    with pytest.raises(ValueError, match=match):
        S.parse_schedules(spec, stages)


def test_base_can_be_refused_and_one_schedule_enforced():
    with pytest.raises(ValueError, match="'base' is not accepted"):
        S.parse_schedules("base;0.5", allow_base=False)
    with pytest.raises(ValueError, match="expected one schedule"):
        S.parse_schedule("0.5;0.4")


def test_format_schedule_round_trips():
    for sched in ([0.5, 0.3, 0.1], [None, 0.5], None, [0.45, 0.25, 0.05]):
        assert S.parse_schedule(S.format_schedule(sched)) == sched
    assert S.format_schedule([0.5, 0.3, 0.1]) == "0.5,0.3,0.1"


def test_old_names_are_the_same_function():
    from lightning_lvp import callbacks, compare

    assert callbacks.paper_schedule is S.paper_schedule
    assert compare.lvp_schedule(0.5, 3) == S.paper_schedule(0.5, 3)
