"""IOA's Organizer on the embedded skill graph: difficulty scale, gating, ceilings, remediation,
state round trip."""

from __future__ import annotations

import pytest

from lit_zpd.callbacks.curriculum import Organizer, normalised_difficulty
from lit_zpd.tasks.arithmetic import SKILL_GRAPH, ArithmeticCurriculum
from lit_zpd.tasks.skills import Deficiency, SkillGraph

GRAPH = SkillGraph(SKILL_GRAPH)
LEVELS = {"add_1digit": [1, 2], "add_carry": [1, 2, 3], "sub": [1, 2, 3], "mul_1digit": [1, 2], "multi_step": [1, 2]}


def organizer(**kw: float) -> Organizer:
    return Organizer(GRAPH, normalised_difficulty(GRAPH, LEVELS), **kw)


def test_difficulty_scale_follows_the_curriculum_in_steps_of_one_eleventh() -> None:
    scale = normalised_difficulty(GRAPH, LEVELS)
    assert scale[("add_1digit", 1)] == 0.0 and scale[("multi_step", 2)] == 1.0
    assert scale[("add_carry", 2)] - scale[("add_carry", 1)] == pytest.approx(1 / 11)
    levels = {}
    for p in ArithmeticCurriculum(problems_per_level=5).problems("train"):
        levels.setdefault(p.skill, set()).add(p.difficulty)
    assert {k: sorted(v) for k, v in levels.items()} == LEVELS


def test_gating_opens_a_skill_only_after_its_prerequisites_are_mastered() -> None:
    org = organizer(active_share=1.0)
    org.identify([Deficiency("mul_1digit", 0.9, 0.25, 0.6), Deficiency("add_carry", 0.5, 0.5, 0.5)])
    # mul_1digit needs add_carry, which is deficient: only add_carry's easiest level is taught.
    assert org.active() == ["add_carry"]
    assert org.frontier() == {("add_carry", 1)}
    assert org.review() == {c for c in org.difficulty if c[0] in {"add_1digit", "sub", "multi_step"}}


def test_ceiling_rises_one_level_at_a_time_and_mastery_moves_on() -> None:
    org = organizer(active_share=1.0)
    org.identify([Deficiency("add_carry", 0.5, 0.5, 0.5), Deficiency("mul_1digit", 0.9, 0.25, 0.6)])
    assert org.update({("add_carry", 1): 0.5})["raised"] == []  # not mastered yet
    assert org.update({("add_carry", 1): 0.95})["raised"] == ["add_carry"]
    assert org.frontier() == {("add_carry", 1), ("add_carry", 2)}  # one level (1/11 <= 0.15), not two
    org.update({("add_carry", 2): 0.92})
    assert ("add_carry", 3) in org.frontier()
    events = org.update({("add_carry", 3): 0.9})
    assert events["mastered"] == ["add_carry"] and "add_carry" in org.mastered
    assert org.active() == ["mul_1digit"] and org.frontier() == {("mul_1digit", 1)}


def test_a_small_step_cap_takes_several_probes_per_level() -> None:
    org = organizer(active_share=1.0, max_difficulty_step=0.05)
    org.identify([Deficiency("add_carry", 0.5, 0.5, 0.5)])
    org.update({("add_carry", 1): 1.0})
    assert org.frontier() == {("add_carry", 1)}  # ceiling rose by 0.05, short of level 2 (0.09 away)
    org.update({})
    assert ("add_carry", 2) in org.frontier()


def test_remediation_sends_a_forgotten_skill_back_to_the_frontier() -> None:
    org = organizer(active_share=1.0)
    org.identify([Deficiency("sub", 0.6, 0.25, 0.4)])
    org.update({("sub", 1): 1.0})
    org.update({("sub", 2): 1.0})
    org.update({("sub", 3): 1.0})
    assert "sub" in org.mastered and org.frontier() == set()
    events = org.update({("sub", 2): 0.5})
    assert events["remediated"] == ["sub"]
    assert org.frontier() == {("sub", 1), ("sub", 2), ("sub", 3)}  # its ceiling is kept


def test_active_share_limits_the_skills_taught_at_once() -> None:
    org = organizer(active_share=0.25)
    org.identify([Deficiency(s, 0.5, 0.0, 0.5) for s in ("add_carry", "sub", "mul_1digit", "multi_step")])
    assert org.active() == ["add_carry"]  # ceil(0.25 * 4) = 1, most severe first among the open ones


def test_state_round_trip_is_plain_data() -> None:
    org = organizer()
    org.identify([Deficiency("add_carry", 0.5, 0.5, 0.5)])
    org.update({("add_carry", 1): 0.95, ("sub", 1): 0.7})
    state = org.state_dict()
    assert all(isinstance(v, (list, dict, int)) for v in state.values())
    restored = organizer()
    restored.load_state_dict(state)
    assert restored.state_dict() == state and restored.frontier() == org.frontier()


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="mastery_ratio"):
        organizer(mastery_ratio=1.5)
    with pytest.raises(ValueError, match="max_difficulty_step"):
        organizer(max_difficulty_step=0.0)


def test_a_rerun_of_the_identifier_keeps_the_stage_and_appends_new_deficiencies() -> None:
    org = organizer(active_share=0.25)
    org.identify([Deficiency("mul_1digit", 0.9, 0.25, 0.6), Deficiency("sub", 0.5, 0.25, 0.4)])
    assert org.active() == ["mul_1digit"]
    # sub is now more severe than mul_1digit, and add_carry has become deficient: the stage being
    # taught stays until mastered; add_carry, mul_1digit's prerequisite, closes it meanwhile.
    added = org.identify([Deficiency("sub", 0.9, 0.25, 0.7), Deficiency("add_carry", 0.5, 0.5, 0.5), Deficiency("mul_1digit", 0.3, 0.25, 0.3)])
    assert added == ["add_carry"] and org.deficient == ["mul_1digit", "sub", "add_carry"]
    assert "add_carry" not in org.mastered and org.frontier() == {("sub", 1)}
    assert org.identified == 2


def test_a_skill_unlocked_by_this_probe_waits_for_the_next_whatever_the_severity_order() -> None:
    org = organizer(active_share=0.25)
    # multi_step (more severe) is listed before its prerequisite mul_1digit.
    org.identify([Deficiency("multi_step", 0.9, 0.0, 0.9), Deficiency("mul_1digit", 0.6, 0.25, 0.5)])
    assert org.active() == ["mul_1digit"]
    events = org.update({("mul_1digit", 1): 1.0, ("mul_1digit", 2): 1.0, ("multi_step", 1): 1.0})
    # mul_1digit is mastered; multi_step opens now but was not taught: no ceiling raise yet.
    assert events == {"raised": [], "mastered": ["mul_1digit"], "remediated": []}
    assert org.frontier() == {("multi_step", 1)}
    assert org.update({})["raised"] == ["multi_step"]
