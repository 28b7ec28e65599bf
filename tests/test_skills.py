"""The skill graph (order, dependents, connectivity, bad graphs) and IOA's deficiency measure."""

from __future__ import annotations

import pytest

from lit_zpd.tasks.arithmetic import SKILL_GRAPH
from lit_zpd.tasks.skills import SkillGraph, deficiencies, relative_gap

EMBEDDED = SkillGraph(SKILL_GRAPH)


def test_order_puts_prerequisites_first_and_breaks_ties_by_name() -> None:
    assert EMBEDDED.order() == ["add_1digit", "add_carry", "mul_1digit", "sub", "multi_step"]
    assert SkillGraph({"c": [], "b": [], "a": ["c"]}).order() == ["b", "c", "a"]


def test_dependents_and_connectivity_on_the_embedded_graph() -> None:
    assert EMBEDDED.dependents("add_1digit") == {"add_carry", "sub", "mul_1digit", "multi_step"}
    assert EMBEDDED.dependents("add_carry") == {"mul_1digit", "multi_step"}
    assert EMBEDDED.dependents("multi_step") == set()
    assert EMBEDDED.connectivity() == {
        "add_1digit": 1.0, "add_carry": 0.5, "sub": 0.25, "mul_1digit": 0.25, "multi_step": 0.0,
    }
    with pytest.raises(KeyError, match="nope"):
        EMBEDDED.dependents("nope")


def test_a_cycle_or_an_unknown_prerequisite_is_named() -> None:
    with pytest.raises(ValueError, match="data.skill_graph has a cycle: a -> b -> a"):
        SkillGraph({"a": ["b"], "b": ["a"]}, where="data.skill_graph")
    with pytest.raises(ValueError, match="skill 'b' has the prerequisite 'z', which is not a skill"):
        SkillGraph({"a": [], "b": ["z"]})


def test_relative_gap_and_severity_order() -> None:
    assert relative_gap(0.8, 0.2) == pytest.approx(0.75)
    assert relative_gap(0.0, 0.0) == 0.0  # the teacher cannot either: nothing to teach
    assert relative_gap(0.5, 0.9) == pytest.approx(-0.8)
    teacher = dict.fromkeys(SKILL_GRAPH, 1.0)
    student = {"add_1digit": 0.6, "add_carry": 0.2, "sub": 0.9, "mul_1digit": 0.1, "multi_step": 0.0}
    found = deficiencies(student, teacher, EMBEDDED, gap_threshold=0.3, alpha=0.5)
    # gaps 0.4, 0.8, (0.1 not deficient), 0.9, 1.0; severity = (gap + connectivity) / 2
    assert [(d.skill, round(d.severity, 3)) for d in found] == [
        ("add_1digit", 0.7), ("add_carry", 0.65), ("mul_1digit", 0.575), ("multi_step", 0.5),
    ]
    # alpha 1 ranks by the gap alone.
    assert [d.skill for d in deficiencies(student, teacher, EMBEDDED, 0.3, alpha=1.0)] == [
        "multi_step", "mul_1digit", "add_carry", "add_1digit",
    ]
    with pytest.raises(ValueError, match="no accuracy measured for skill 'sub'"):
        deficiencies({k: v for k, v in student.items() if k != "sub"}, teacher, EMBEDDED, 0.3, 0.5)
