import itertools
import re

import pytest

from lit_zpd.tasks.arithmetic import ArithmeticCurriculum, solve_add, solve_mul, solve_multi_step, solve_sub
from lit_zpd.tasks.problem import SPLITS
from lit_zpd.tasks.verifier import extract_boxed, score_response

_LINE = re.compile(r"(\d+(?:[+\-*]\d+)*)=(\d+)")


def _evaluate(expression: str) -> int:
    assert re.fullmatch(r"[\d+\-*()]+", expression), expression
    return eval(expression, {"__builtins__": {}})


def _expression(prompt: str) -> str:
    return prompt.removesuffix("=?\n")


def _all_problems(source):
    return [p for split in SPLITS for p in source.problems(split)]


@pytest.fixture(scope="module")
def curriculum():
    return ArithmeticCurriculum(seed=0)


@pytest.fixture(scope="module")
def small():
    return ArithmeticCurriculum(seed=0, problems_per_level=60)


def test_same_seed_same_problems(small):
    again = ArithmeticCurriculum(seed=0, problems_per_level=60)
    for split in SPLITS:
        assert small.problems(split) == again.problems(split)


def test_different_seed_different_problems(small):
    other = ArithmeticCurriculum(seed=1, problems_per_level=60)
    assert small.problems("train") != other.problems("train")


def test_problems_returns_a_new_list(small):
    first = small.problems("train")
    first.clear()
    assert small.problems("train")


@pytest.mark.parametrize("problems_per_level", [60, 2000])
def test_splits_share_no_prompt(problems_per_level, curriculum, small):
    source = curriculum if problems_per_level == 2000 else small
    prompts = {split: {p.prompt for p in source.problems(split)} for split in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not prompts[a] & prompts[b], (a, b)


def test_split_does_not_depend_on_problems_per_level(curriculum, small):
    for a, b in itertools.permutations(SPLITS, 2):
        shared = {p.prompt for p in small.problems(a)} & {p.prompt for p in curriculum.problems(b)}
        assert not shared, (a, b)


def test_problem_ids_unique(curriculum):
    ids = [p.problem_id for p in _all_problems(curriculum)]
    assert len(ids) == len(set(ids))


def test_answers_are_correct_and_verified(curriculum):
    for p in _all_problems(curriculum):
        assert p.answer == str(_evaluate(_expression(p.prompt))), p
        assert extract_boxed(p.reference) == p.answer, p
        assert score_response(p.reference, p.answer) == 1.0, p


def test_every_reference_line_is_correct(curriculum):
    for p in _all_problems(curriculum):
        *work, last = p.reference.split("\n")
        assert last == f"\\boxed{{{p.answer}}}", p
        assert work, p
        for line in work:
            match = _LINE.fullmatch(line)
            assert match, (line, p)
            assert _evaluate(match[1]) == int(match[2]), (line, p)


@pytest.mark.parametrize(
    ("reference", "answer"),
    [
        (solve_add(95, 17), "112"),
        (solve_add(999, 1), "1000"),
        (solve_sub(100, 1), "99"),
        (solve_sub(45, 45), "0"),
        (solve_mul(99, 9), "891"),
        (solve_multi_step("(3+4)*5"), "35"),
        (solve_multi_step("3+4*5"), "23"),
        (solve_multi_step("3*4-5"), "7"),
    ],
)
def test_solvers_edge_cases(reference, answer):
    assert extract_boxed(reference) == answer


def test_skills_and_graph(curriculum):
    graph = curriculum.skill_graph()
    train = curriculum.problems("train")
    present = {p.skill for p in train}
    assert len(present) >= 5
    assert set(graph) == present
    assert curriculum.skills() == list(graph)
    for skill, prereqs in graph.items():
        assert set(prereqs) <= present, skill
    # Kahn's algorithm consumes every node only if the graph is acyclic.
    remaining = {skill: set(prereqs) for skill, prereqs in graph.items()}
    while remaining:
        ready = [s for s, prereqs in remaining.items() if not prereqs]
        assert ready, f"cycle among {sorted(remaining)}"
        for s in ready:
            del remaining[s]
        for prereqs in remaining.values():
            prereqs.difference_update(ready)


def test_every_skill_has_graded_levels(curriculum):
    levels: dict[str, set[int]] = {}
    for p in curriculum.problems("train"):
        levels.setdefault(p.skill, set()).add(p.difficulty)
    for skill, found in levels.items():
        assert len(found) >= 2, skill
        assert min(found) == 1, skill


@pytest.mark.parametrize("source_name", ["curriculum", "small"])
def test_validation_covers_every_skill(source_name, request):
    source = request.getfixturevalue(source_name)
    assert {p.skill for p in source.problems("validation")} == set(source.skills())


def test_max_eval_per_skill_caps_evaluation(curriculum):
    for split in ("validation", "test"):
        counts: dict[str, int] = {}
        for p in curriculum.problems(split):
            counts[p.skill] = counts.get(p.skill, 0) + 1
        assert max(counts.values()) <= 40


@pytest.mark.parametrize(
    "kwargs",
    [
        {"problems_per_level": 0},
        {"validation_fraction": 0.0},
        {"test_fraction": -0.1},
        {"validation_fraction": 0.5, "test_fraction": 0.5},
        {"prompt_template": "{expr}=?"},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ArithmeticCurriculum(**kwargs)
