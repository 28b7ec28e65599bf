"""A user's data set as problems: rows of a file or a Hugging Face data set, column by column.

Rows are read with the ``datasets`` library from a JSONL, JSON or Parquet file, from a directory
written by ``save_to_disk``, or from a local data set directory that ``load_dataset`` reads. Each
row becomes one :class:`Problem`: the prompt column goes through ``prompt_template``, the answer
column through an answer extractor and :func:`normalize_answer`. A row that cannot become a
problem stops loading with an error naming its index and field, rather than being skipped, so a
silently shrunken data set never passes for the real one.

Splits the data set does not provide are carved out of train by a hash of the prompt and the seed
(as :meth:`ArithmeticCurriculum.split_of` does), so validation and test never share a problem with
train and keep their members when rows are added or removed elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lit_zpd.tasks.problem import SPLITS, Problem, ProblemSource, Split, cap_per_skill, hash_split
from lit_zpd.tasks.skills import find_cycle
from lit_zpd.tasks.verifier import (
    EXTRACTORS,
    AnswerExtractor,
    Verifier,
    VerifierName,
    extract_boxed,
    make_verifier,
    normalize_answer,
)

if TYPE_CHECKING:
    from datasets import Dataset

FIELDS = ("prompt", "answer", "reference", "skill", "difficulty", "problem_id")
DEFAULT_FIELDS = {"prompt": "prompt", "answer": "answer"}
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_EXTRACTION_FAILURES = {
    "boxed": "no \\boxed{} answer found",
    "gsm8k": "no '####' answer found",
    "last_number": "no number found",
    "identity": "empty answer",
}


class _FieldError(Exception):
    """A row's field cannot be read; the caller adds the row index and the column."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(why)
        self.field = field
        self.why = why


class DatasetSource(ProblemSource):
    """Problems read from a user's data set, one per row.

    Args:
        path: A ``.jsonl``, ``.json`` or ``.parquet`` file, or a directory: one written by
            ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a local data set
            directory that ``datasets.load_dataset`` reads (split files such as
            ``data/train.jsonl`` are found by name). A file is the train split.
        splits: Where each of ``train``, ``validation`` and ``test`` comes from: a data file
            (absolute, or relative to ``path``'s directory) or the name of a split of the data set
            at ``path``. Unmapped splits use the data set's split of the same name; a data set
            with a single split uses it as train whatever its name. Validation and test found
            nowhere, or not mapped when train is a file, are carved out of train.
        fields: Column of each problem field, ``{field: column}``; fields are ``prompt``,
            ``answer``, ``reference``, ``skill``, ``difficulty`` and ``problem_id``. Merged over
            the default ``{"prompt": "prompt", "answer": "answer"}``. Unmapped optional fields
            take the :class:`Problem` defaults; ``problem_id`` defaults to the first 12 hex
            digits of the SHA-256 of the prompt column, so ids do not depend on the split.
        answer_extractor: How the answer is read from the answer column: ``"gsm8k"`` takes the
            text after ``####``, ``"boxed"`` the last ``\\boxed{}``, ``"last_number"`` the last
            number, ``"identity"`` the whole value.
        reference_from_answer: Build the reference solution from the answer column, GSM8K
            style: its text before ``####`` followed by ``\\boxed{answer}``. Ignored when
            ``fields`` maps ``reference``.
        prompt_template: Format of the prompt; ``{prompt}`` is replaced by the prompt column.
            Literal braces are written doubled (``\\boxed{{}}``).
        validation_fraction: Share of train rows hashed into validation when the data set has
            no validation split.
        test_fraction: Share of train rows hashed into test when the data set has no test split.
        seed: Decides which rows are carved into validation and test.
        max_eval_per_skill: Cap on validation and test problems per skill, taken round-robin
            over difficulty levels; ``None`` keeps all.
        skill_graph: The prerequisite map ``{skill: [prerequisite, ...]}``, written in the YAML
            config itself: a DAG over the skills of the data set; skills it leaves out have no
            prerequisites. ``None`` (and no ``skill_graph_path``): no skill has any.
        skill_graph_path: The same map in a YAML or JSON file, instead of ``skill_graph``.
        verifier: Scores the model's responses: ``boxed`` (default), ``gsm8k`` (``#### 42``),
            ``last_number``, ``math_verify`` (LaTeX answers compared symbolically) or a
            :class:`~lit_zpd.tasks.verifier.Verifier` given by ``class_path``.

    Example::

        source = DatasetSource(
            "gsm8k/train.jsonl",
            fields={"prompt": "question", "answer": "answer"},
            answer_extractor="gsm8k",
            reference_from_answer=True,
        )
        problem = source.problems("train")[0]
    """

    def __init__(
        self,
        path: str,
        splits: dict[str, str] | None = None,
        fields: dict[str, str] | None = None,
        answer_extractor: AnswerExtractor = "identity",
        reference_from_answer: bool = False,
        prompt_template: str = "{prompt}\n",
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        max_eval_per_skill: int | None = None,
        skill_graph: dict[str, list[str]] | None = None,
        skill_graph_path: str | None = None,
        verifier: VerifierName | Verifier = "boxed",
    ) -> None:
        self.root = Path(path)
        if not self.root.exists():
            raise ValueError(f"path: no such file or directory: {path!r}")
        if self.root.is_file():
            _check_file_format(self.root, "path")
        self.splits = dict(splits or {})
        for split, source in self.splits.items():
            if split not in SPLITS:
                raise ValueError(f"splits: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
            if not isinstance(source, str) or not source:
                raise ValueError(f"splits.{split}: expected a file or a split name, got {source!r}")
        self.split_files = {split: self._split_file(split, source) for split, source in self.splits.items()}
        for field, column in (fields or {}).items():
            if field not in FIELDS:
                raise ValueError(f"fields: unknown field {field!r}; expected one of {', '.join(FIELDS)}")
            if not isinstance(column, str) or not column:
                raise ValueError(f"fields.{field}: expected a column name, got {column!r}")
        self.fields = {**DEFAULT_FIELDS, **(fields or {})}
        if answer_extractor not in EXTRACTORS:
            raise ValueError(f"answer_extractor: expected one of {', '.join(EXTRACTORS)}, got {answer_extractor!r}")
        self.answer_extractor = answer_extractor
        self.reference_from_answer = reference_from_answer
        _check_prompt_template(prompt_template)
        self.prompt_template = prompt_template
        if not (validation_fraction > 0 and test_fraction > 0 and validation_fraction + test_fraction < 1):
            raise ValueError(
                "validation_fraction and test_fraction must be > 0 and sum to < 1, got "
                f"{validation_fraction} and {test_fraction}"
            )
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        if max_eval_per_skill is not None and max_eval_per_skill < 1:
            raise ValueError(f"max_eval_per_skill must be >= 1 or null, got {max_eval_per_skill}")
        self.max_eval_per_skill = max_eval_per_skill
        if skill_graph is not None and skill_graph_path is not None:
            raise ValueError("give the prerequisite map once: skill_graph or skill_graph_path, not both")
        self.skill_graph_path = skill_graph_path
        self._graph_key = "skill_graph" if skill_graph is not None else f"skill_graph_path: {skill_graph_path}"
        self.verifier = make_verifier(verifier, "data.source.verifier")
        if skill_graph is not None:
            self._declared_graph: dict[str, list[str]] | None = _check_skill_graph(skill_graph, "skill_graph")
        else:
            self._declared_graph = None if skill_graph_path is None else _read_skill_graph(skill_graph_path)
        self._cache: dict[Split, list[Problem]] | None = None

    def problems(self, split: Split) -> list[Problem]:
        if self._cache is None:
            self._cache = self._build()
        return list(self._cache[split])

    def skill_graph(self) -> dict[str, list[str]]:
        present = sorted({p.skill for split in SPLITS for p in self.problems(split)})
        if self._declared_graph is None:
            return {skill: [] for skill in present}
        named = set(self._declared_graph).union(*self._declared_graph.values())
        unknown = sorted(named - set(present))
        if unknown:
            raise ValueError(
                f"{self._graph_key} names skill {unknown[0]!r}, which no "
                f"problem has; the data set's skills are {', '.join(present)}"
            )
        return {skill: list(self._declared_graph.get(skill, [])) for skill in present}

    def split_of(self, prompt: str) -> Split:
        """The split a train row with this prompt column is carved into, if that split is missing."""
        return hash_split(prompt, self.seed, self.validation_fraction, self.test_fraction)

    def _split_file(self, split: str, source: str) -> Path | None:
        """The data file a ``splits`` entry names, or ``None`` when it names a split instead."""
        base = self.root if self.root.is_dir() else self.root.parent
        candidate = Path(source) if Path(source).is_absolute() else base / source
        if not candidate.is_file():
            return None
        _check_file_format(candidate, f"splits.{split}")
        return candidate

    def _tables(self) -> dict[Split, tuple[str, Dataset]]:
        """The rows of each split the data set provides, with a name for error messages."""
        tables: dict[Split, tuple[str, Dataset]] = {}
        base: dict[str, Dataset] | None = None
        used: set[str] = set()
        for split in SPLITS:
            file = self.split_files.get(split)
            if file is not None:
                tables[split] = (str(file), _load_file(file))
                continue
            name = self.splits.get(split)
            if name is None and split != "train" and self.split_files.get("train") is not None:
                # Carved out of the train file: a data set at path is not consulted beside it.
                continue
            if base is None:
                base = _load_path(self.root)
            if name is not None and name not in base:
                raise ValueError(
                    f"splits.{split}: {name!r} is neither a data file nor a split of {self.root} "
                    f"(its splits: {', '.join(base)})"
                )
            if name is None and split in base and split not in used:
                name = split
            elif name is None and split == "train" and len(base) == 1:
                name = next(iter(base))
            elif name is None and split == "train":
                raise ValueError(
                    f"path: {self.root} has splits {', '.join(base)} and none named 'train'; "
                    "choose one with splits.train"
                )
            elif name is None:
                continue
            used.add(name)
            tables[split] = (f"{self.root} split {name!r}", base[name])
        sources = [where for where, _ in tables.values()]
        repeated = sorted({where for where in sources if sources.count(where) > 1})
        if repeated:
            raise ValueError(f"splits: {repeated[0]} is read as more than one split")
        return tables

    def _build(self) -> dict[Split, list[Problem]]:
        tables = self._tables()
        splits: dict[Split, list[Problem]] = {"train": [], "validation": [], "test": []}
        occurrences: dict[str, int] = {}
        first_seen: dict[str, str] = {}
        for split in SPLITS:
            if split not in tables:
                continue
            where, table = tables[split]
            if len(table) == 0:
                raise ValueError(f"{where}: no rows")
            for index, row in enumerate(table):
                try:
                    problem = self._problem(row)
                except _FieldError as error:
                    raise ValueError(
                        f"{where}: row {index}: field {error.field!r} "
                        f"(column {self.fields[error.field]!r}): {error.why}"
                    ) from None
                occurrences[problem.problem_id] = occurrences.get(problem.problem_id, 0) + 1
                if occurrences[problem.problem_id] > 1:
                    if "problem_id" in self.fields:
                        raise ValueError(
                            f"{where}: row {index}: field 'problem_id' (column "
                            f"{self.fields['problem_id']!r}): {problem.problem_id!r} repeats "
                            f"{first_seen[problem.problem_id]}"
                        )
                    # A repeated prompt: keep both rows, with ids that stay stable across runs.
                    count = occurrences[problem.problem_id]
                    problem = dataclasses.replace(problem, problem_id=f"{problem.problem_id}-{count}")
                first_seen.setdefault(problem.problem_id, f"{where} row {index}")
                target = split
                if split == "train":
                    carved = self.split_of(row[self.fields["prompt"]])
                    target = carved if carved not in tables else "train"
                splits[target].append(problem)
        if self.max_eval_per_skill is not None:
            for split in ("validation", "test"):
                splits[split] = cap_per_skill(splits[split], self.max_eval_per_skill)
        return splits

    def _problem(self, row: Mapping[str, Any]) -> Problem:
        prompt = self._value(row, "prompt")
        if not isinstance(prompt, str):
            raise _FieldError("prompt", f"expected text, got {type(prompt).__name__}")
        if not prompt.strip():
            raise _FieldError("prompt", "empty prompt")
        raw_answer = _as_text(self._value(row, "answer"), "answer")
        extracted = EXTRACTORS[self.answer_extractor](raw_answer)
        answer = normalize_answer(extracted) if extracted is not None else ""
        if not answer:
            raise _FieldError("answer", _EXTRACTION_FAILURES[self.answer_extractor])
        return Problem(
            problem_id=(
                _as_text(self._value(row, "problem_id"), "problem_id")
                if "problem_id" in self.fields
                else hashlib.sha256(prompt.encode()).hexdigest()[:12]
            ),
            prompt=self.prompt_template.format(prompt=prompt),
            answer=answer,
            reference=self._reference(row, raw_answer, answer),
            skill=_as_text(self._value(row, "skill"), "skill") if "skill" in self.fields else "default",
            difficulty=self._difficulty(row) if "difficulty" in self.fields else 1,
        )

    def _reference(self, row: Mapping[str, Any], raw_answer: str, answer: str) -> str | None:
        if "reference" in self.fields:
            # Problem.reference is optional, so a row without one is still a problem.
            value = self._value(row, "reference", optional=True)
            if value is None or value == "":
                return None
            reference = _as_text(value, "reference")
            boxed = extract_boxed(reference)
            if boxed is None or normalize_answer(boxed) != answer:
                raise _FieldError(
                    "reference", f"its last \\boxed{{}} is {boxed!r}, which does not match the answer {answer!r}"
                )
            return reference
        if not self.reference_from_answer:
            return None
        reasoning = raw_answer.rsplit("####", 1)[0].strip() if "####" in raw_answer else raw_answer.strip()
        return f"{reasoning}\n\\boxed{{{answer}}}" if reasoning else f"\\boxed{{{answer}}}"

    def _difficulty(self, row: Mapping[str, Any]) -> int:
        value = self._value(row, "difficulty")
        # Parquet stores an integer column with gaps as floats.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _FieldError("difficulty", f"expected an integer >= 1, got {value!r}")
        return value

    def _value(self, row: Mapping[str, Any], field: str, optional: bool = False) -> Any:
        column = self.fields[field]
        if column not in row:
            raise _FieldError(field, f"no such column; the columns are {', '.join(row)}")
        if row[column] is None and not optional:
            raise _FieldError(field, "missing value")
        return row[column]


def _as_text(value: Any, field: str) -> str:
    # JSON and Parquet type numeric answers and ids as numbers; they are compared as text.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _FieldError(field, f"expected text or a number, got {type(value).__name__}")
    return value


def _check_file_format(file: Path, key: str) -> None:
    if file.suffix.lower() not in FILE_FORMATS:
        raise ValueError(f"{key}: {str(file)!r} is not a {', '.join(FILE_FORMATS)} file")


def _check_prompt_template(template: str) -> None:
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"prompt_template: only '{{prompt}}' may be replaced; write literal braces doubled ({error!r})"
        ) from None
    if "{prompt}" not in template:
        raise ValueError("prompt_template must contain '{prompt}'")


def _load_file(file: Path) -> Dataset:
    """The rows of one data file. An empty file, or a JSON Lines file with a line that is not a
    JSON object, is an error naming the file and the line (``datasets`` reports the first as a
    bare ``StopIteration`` and buries the second in its own traceback)."""
    # Imported here: datasets pulls in pyarrow and pandas, which users of other sources need not load.
    import datasets

    suffix = file.suffix.lower()
    if file.stat().st_size == 0 or (suffix != ".parquet" and not file.read_bytes().strip()):
        raise ValueError(f"{file}: the file is empty (a data file needs at least one row)")
    if suffix == ".jsonl":
        _check_json_lines(file)
    if suffix == ".parquet" and _parquet_rows(file) == 0:
        raise ValueError(f"{file}: no rows")
    try:
        return datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(file), split="train")
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__ or error
        raise ValueError(f"{file}: cannot be read as {FILE_FORMATS[suffix]}: {cause}") from error


def _parquet_rows(file: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file).metadata.num_rows
    except Exception as error:  # noqa: BLE001 - pyarrow raises several kinds on a damaged file
        raise ValueError(f"{file}: not a readable Parquet file: {error}") from error


def _check_json_lines(file: Path) -> None:
    """Every non-blank line of ``file`` is a JSON object, or an error names the first that is not."""
    with file.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{file}: line {number}: not valid JSON ({error.msg} at column {error.colno}): {line.strip()[:80]!r}"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{file}: line {number}: expected a JSON object (one row), got {type(row).__name__}")


def _load_path(root: Path) -> dict[str, Dataset]:
    """Every split of the data set at ``path``, by name."""
    import datasets

    if root.is_file():
        return {"train": _load_file(root)}
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
    else:
        loaded = datasets.load_dataset(str(root))
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _read_skill_graph(path: str) -> dict[str, list[str]]:
    """The prerequisite map in a YAML or JSON file (YAML reads both)."""
    try:
        graph = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"skill_graph_path: no such file: {path!r}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"skill_graph_path: {path} is not valid YAML or JSON: {error}") from None
    return _check_skill_graph(graph, f"skill_graph_path: {path}")


def _check_skill_graph(graph: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(graph, dict) or not all(
        isinstance(skill, str) and isinstance(prereqs, list) and all(isinstance(p, str) for p in prereqs)
        for skill, prereqs in graph.items()
    ):
        raise ValueError(f"{where} must be a map {{skill: [prerequisite, ...]}} of names (quote names YAML reads as other types: 'yes', 'on', 1)")
    cycle = find_cycle(graph)
    if cycle:
        raise ValueError(f"{where} has a cycle: {' -> '.join(cycle)}")
    return graph
