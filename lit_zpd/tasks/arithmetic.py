"""The embedded default task: a seeded arithmetic curriculum with worked column solutions.

Five skills joined by a prerequisite graph, each with graded difficulty levels::

    add_1digit ─┬─> add_carry ──> mul_1digit ─┐
                └─> sub ──────────────────────┴─> multi_step

Every reference solution works digit by digit, one line per column, so a small model can learn
the algorithm instead of memorising results; it ends in ``\\boxed{answer}``. A problem's split is
decided by a hash of its expression and the seed, so train, validation and test never share a
problem whatever sizes are asked for.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import replace

from lit_zpd.tasks.privileged import COMPACT_TEMPLATE, CONTEXT_COPY_MARK, PrivilegedContext
from lit_zpd.tasks.problem import Problem, ProblemSource, Split, cap_per_skill, hash_split
from lit_zpd.tasks.verifier import Verifier, VerifierName, make_verifier

SKILL_GRAPH: dict[str, list[str]] = {
    "add_1digit": [],
    "add_carry": ["add_1digit"],
    "sub": ["add_1digit"],
    "mul_1digit": ["add_carry"],
    "multi_step": ["mul_1digit", "sub"],
}


def _digits(n: int, width: int) -> list[int]:
    """Least significant first, zero-padded to ``width``."""
    return [(n // 10**i) % 10 for i in range(width)]


def solve_add(a: int, b: int) -> str:
    width = max(len(str(a)), len(str(b)))
    lines, carry = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return "\n".join(lines) + f"\n\\boxed{{{a + b}}}"


def solve_sub(a: int, b: int) -> str:
    width = len(str(a))
    lines, borrow = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        top = x if x - y - borrow >= 0 else x + 10
        lines.append(f"{top}-{y}-{borrow}={top - y - borrow}")
        borrow = int(top != x)
    return "\n".join(lines) + f"\n\\boxed{{{a - b}}}"


def solve_mul(a: int, b: int) -> str:
    lines, carry = [], 0
    for x in _digits(a, len(str(a))):
        s = x * b + carry
        lines.append(f"{x}*{b}+{carry}={s}")
        carry = s // 10
    return "\n".join(lines) + f"\n\\boxed{{{a * b}}}"


def solve_multi_step(expr: str) -> str:
    """Expressions of three single digits; the inner operation is written first."""
    if expr.startswith("("):
        a, b, c = int(expr[1]), int(expr[3]), int(expr[6])
        s = a + b
        return f"{a}+{b}={s}\n{s}*{c}={s * c}\n\\boxed{{{s * c}}}"
    a, _, b, op2, c = int(expr[0]), expr[1], int(expr[2]), expr[3], int(expr[4])
    if op2 == "*":  # a+b*c
        m = b * c
        return f"{b}*{c}={m}\n{a}+{m}={a + m}\n\\boxed{{{a + m}}}"
    m = a * b
    result = m + c if op2 == "+" else m - c
    return f"{a}*{b}={m}\n{m}{op2}{c}={result}\n\\boxed{{{result}}}"


def _multi_step_answer(expr: str) -> int:
    # The expressions are produced by this module from single digits and + - * ( ) only.
    return int(eval(expr, {"__builtins__": {}}))  # noqa: S307


def _rand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _level_generators() -> dict[tuple[str, int], Callable[[random.Random], str]]:
    """One expression sampler per (skill, difficulty)."""

    def add(da: int, db: int) -> Callable[[random.Random], str]:
        return lambda r: f"{_rand(r, da)}+{_rand(r, db)}"

    def sub(da: int, db: int) -> Callable[[random.Random], str]:
        def make(r: random.Random) -> str:
            a, b = _rand(r, da), _rand(r, db)
            return f"{max(a, b)}-{min(a, b)}"

        return make

    def mul(da: int) -> Callable[[random.Random], str]:
        return lambda r: f"{_rand(r, da)}*{r.randint(2, 9)}"

    def single_digit_sum(r: random.Random) -> str:
        a = r.randint(0, 9)
        return f"{a}+{r.randint(0, 9 - a)}"

    def single_digit_carry(r: random.Random) -> str:
        a = r.randint(1, 9)
        return f"{a}+{r.randint(10 - a, 9)}"

    def two_ops(r: random.Random) -> str:
        a, b, c = (r.randint(1, 9) for _ in range(3))
        return r.choice([f"{a}+{b}*{c}", f"{a}*{b}+{c}"])

    def grouped_or_minus(r: random.Random) -> str:
        a, b, c = (r.randint(1, 9) for _ in range(3))
        if r.random() < 0.5 and a + b <= 9:
            return f"({a}+{b})*{c}"
        return f"{a}*{b}-{min(c, a * b)}"

    return {
        ("add_1digit", 1): single_digit_sum,
        ("add_1digit", 2): single_digit_carry,
        ("add_carry", 1): add(2, 2),
        ("add_carry", 2): add(3, 2),
        ("add_carry", 3): add(3, 3),
        ("sub", 1): sub(2, 1),
        ("sub", 2): sub(2, 2),
        ("sub", 3): sub(3, 2),
        ("mul_1digit", 1): mul(2),
        ("mul_1digit", 2): mul(3),
        ("multi_step", 1): two_ops,
        ("multi_step", 2): grouped_or_minus,
    }


def solve(skill: str, expr: str) -> tuple[str, str]:
    """(reference solution, answer) of one expression."""
    if skill == "multi_step":
        return solve_multi_step(expr), str(_multi_step_answer(expr))
    for op, solver in (("+", solve_add), ("-", solve_sub), ("*", solve_mul)):
        if op in expr:
            a, b = (int(x) for x in expr.split(op))
            reference = solver(a, b)
            return reference, reference.rsplit("{", 1)[1].rstrip("}")
    raise ValueError(f"not an expression of skill {skill!r}: {expr!r}")


class ArithmeticCurriculum(ProblemSource):
    """Seeded synthetic arithmetic with a prerequisite graph, graded difficulty and column solutions.

    Args:
        seed: Decides which expressions are drawn and which split each one lands in.
        problems_per_level: Distinct expressions drawn per (skill, difficulty) before splitting;
            small levels (single-digit addition) hold fewer.
        validation_fraction: Share of expressions hashed into the validation split.
        test_fraction: Share of expressions hashed into the test split.
        max_eval_per_skill: Cap on validation and test problems per skill, to keep evaluation
            fast; ``None`` keeps all.
        prompt_template: Format of the prompt; ``{expression}`` is replaced.
        verifier: Scores responses: ``boxed`` (the references end in ``\\boxed{answer}``),
            ``last_number``, ``gsm8k``, ``math_verify`` or a :class:`~lit_zpd.tasks.verifier.Verifier`.
        context_copies: How many times, on average, each training problem appears again (id
            suffix ``#context1``, ``#context2``, ...) with a partial reference in its prompt: the
            compact privileged template with the first ``k`` column lines (``k`` uniform in
            ``0..m``, drawn per copy) and the answer line half of the time. The whole part is
            given to every problem, the fraction to that share of them. SFT on these teaches a
            model to read a privileged context (the embedded student is trained with 3, the
            teacher with 0.3). 0 adds none.

    The privileged context of this source (:meth:`privileged_context`) is
    :data:`~lit_zpd.tasks.privileged.COMPACT_TEMPLATE` cut into lines: the problem follows the
    revealed lines, so the response starts right after the same ``{expression}=?`` line as the
    student's.

    Example::

        source = ArithmeticCurriculum(seed=0)
        problem = source.problems("train")[0]
        problem.prompt, problem.reference, problem.answer
    """

    def __init__(
        self,
        seed: int = 0,
        problems_per_level: int = 2000,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_eval_per_skill: int | None = 40,
        prompt_template: str = "{expression}=?\n",
        verifier: VerifierName | Verifier = "boxed",
        context_copies: float = 0.0,
    ) -> None:
        if problems_per_level < 1:
            raise ValueError(f"problems_per_level must be >= 1, got {problems_per_level}")
        if not (validation_fraction > 0 and test_fraction > 0 and validation_fraction + test_fraction < 1):
            raise ValueError(
                "validation_fraction and test_fraction must be > 0 and sum to < 1, got "
                f"{validation_fraction} and {test_fraction}"
            )
        if not 0.0 <= context_copies < 100:
            raise ValueError(f"context_copies must be in [0, 100), got {context_copies}")
        if "{expression}" not in prompt_template:
            raise ValueError("prompt_template must contain '{expression}'")
        self.seed = seed
        self.problems_per_level = problems_per_level
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction
        self.max_eval_per_skill = max_eval_per_skill
        self.prompt_template = prompt_template
        self.verifier = make_verifier(verifier, "data.source.verifier")
        self.context_copies = context_copies
        self._cache: dict[Split, list[Problem]] | None = None

    def privileged_context(self) -> PrivilegedContext:
        return PrivilegedContext(COMPACT_TEMPLATE, segment_by="lines")

    def rewrite_solution(self, problem: Problem, response: str) -> str | None:
        """The worked column solution of ``problem`` (one line per column, every carry and borrow
        written out, the inner operation of a multi-step expression first) when ``response``
        reaches its answer; ``None`` otherwise. Every correct response of a problem is rewritten
        into the same text: its reference solution, the template the student was trained on."""
        if self.verifier.score(response, problem.answer) <= 0:
            return None
        expression = problem.problem_id.split("/", 1)[1].split(CONTEXT_COPY_MARK, 1)[0]
        return solve(problem.skill, expression)[0]

    def skill_graph(self) -> dict[str, list[str]]:
        return {skill: list(prereqs) for skill, prereqs in SKILL_GRAPH.items()}

    def split_of(self, expression: str) -> Split:
        return hash_split(expression, self.seed, self.validation_fraction, self.test_fraction)

    def problems(self, split: Split) -> list[Problem]:
        if self._cache is None:
            self._cache = self._build()
        return list(self._cache[split])

    def _expressions(self, skill: str, level: int, make: Callable[[random.Random], str]) -> Iterator[str]:
        rng = random.Random(f"{self.seed}:{skill}:{level}")
        seen: set[str] = set()
        misses = 0
        # Small levels run out of distinct expressions: stop after many consecutive repeats.
        while len(seen) < self.problems_per_level and misses < 2000:
            expr = make(rng)
            if expr in seen:
                misses += 1
                continue
            misses = 0
            seen.add(expr)
            yield expr

    def _build(self) -> dict[Split, list[Problem]]:
        splits: dict[Split, list[Problem]] = {"train": [], "validation": [], "test": []}
        for (skill, level), make in _level_generators().items():
            for expr in self._expressions(skill, level, make):
                reference, answer = solve(skill, expr)
                split = self.split_of(expr)
                splits[split].append(
                    Problem(
                        problem_id=f"{skill}/{expr}",
                        prompt=self.prompt_template.format(expression=expr),
                        answer=answer,
                        reference=reference,
                        skill=skill,
                        difficulty=level,
                    )
                )
        if self.context_copies > 0:
            splits["train"] += [copy for p in splits["train"] for copy in self._with_context(p)]
        if self.max_eval_per_skill is not None:
            for split in ("validation", "test"):
                splits[split] = cap_per_skill(splits[split], self.max_eval_per_skill)
        return splits

    def _with_context(self, problem: Problem) -> list[Problem]:
        """The problem's copies with a partial reference in the prompt (``context_copies``)."""
        rng = random.Random(f"{self.seed}:context:{problem.problem_id}")
        copies = int(self.context_copies) + (rng.random() < self.context_copies % 1)
        context = self.privileged_context()
        lines = len(context.split(problem)[0])
        out = []
        for i in range(1, copies + 1):
            prompt = context.prompt(problem, rng.randint(0, lines), with_answer=rng.random() < 0.5)
            out.append(replace(problem, problem_id=f"{problem.problem_id}{CONTEXT_COPY_MARK}{i}", prompt=prompt))
        return out
