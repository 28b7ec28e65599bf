import hashlib
import itertools
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_zpd.tasks import DatasetSource, Problem, ProblemSource, score_response
from lit_zpd.tasks.problem import SPLITS

GSM8K_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """Keep the Arrow files `load_dataset` writes out of the user's cache and the data directories."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def numbered_rows(n, start=0):
    return [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(start, start + n)]


def all_problems(source):
    return [p for split in SPLITS for p in source.problems(split)]


def test_jsonl_with_field_mapping(tmp_path):
    rows = [
        {"q": "2+2?", "sol": "so \\boxed{4}", "final": 4, "topic": "add", "level": 1, "uid": "a"},
        {"q": "3*3?", "sol": "\\boxed{9}", "final": "9", "topic": "mul", "level": 2, "uid": "b"},
    ]
    source = DatasetSource(
        str(write_jsonl(tmp_path / "data.jsonl", rows)),
        fields={
            "prompt": "q",
            "answer": "final",
            "reference": "sol",
            "skill": "topic",
            "difficulty": "level",
            "problem_id": "uid",
        },
        prompt_template="Q: {prompt}\nA:",
        validation_fraction=0.01,
        test_fraction=0.01,
    )
    assert isinstance(source, ProblemSource)
    assert sorted(all_problems(source), key=lambda p: p.problem_id) == [
        Problem("a", "Q: 2+2?\nA:", "4", "so \\boxed{4}", "add", 1),
        Problem("b", "Q: 3*3?\nA:", "9", "\\boxed{9}", "mul", 2),
    ]
    assert source.skill_graph() == {"add": [], "mul": []}
    assert source.skills() == ["add", "mul"]


def test_defaults_and_stable_ids(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", numbered_rows(1)))
    source = DatasetSource(path, validation_fraction=0.01, test_fraction=0.01)
    (problem,) = all_problems(source)
    expected_id = hashlib.sha256(b"What is 0 + 1?").hexdigest()[:12]
    assert problem == Problem(expected_id, "What is 0 + 1?\n", "1", None, "default", 1)


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    table = pa.table({"prompt": ["1+1?", "5-2?"], "answer": [2, 3], "difficulty": [1.0, 3.0]})
    pq.write_table(table, path)
    source = DatasetSource(
        str(path),
        fields={"difficulty": "difficulty"},
        answer_extractor="last_number",
        validation_fraction=0.01,
        test_fraction=0.01,
    )
    problems = sorted(all_problems(source), key=lambda p: p.prompt)
    assert [(p.prompt, p.answer, p.difficulty) for p in problems] == [("1+1?\n", "2", 1), ("5-2?\n", "3", 3)]


def test_saved_hf_dataset(tmp_path):
    rows = numbered_rows(20)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    source = DatasetSource(str(tmp_path / "saved"))
    problems = all_problems(source)
    assert sorted(p.answer for p in problems) == sorted(r["answer"] for r in rows)


def test_saved_hf_dataset_dict_keeps_its_splits(tmp_path):
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(numbered_rows(30)),
            "test": datasets.Dataset.from_list(numbered_rows(5, start=100)),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    source = DatasetSource(str(tmp_path / "saved"), validation_fraction=0.3)
    test_answers = sorted(int(p.answer) for p in source.problems("test"))
    assert test_answers == list(range(101, 106))
    assert source.problems("validation")
    carved = {p.prompt for p in source.problems("validation")}
    assert carved.isdisjoint(p.prompt for p in source.problems("train"))
    assert len(source.problems("train")) + len(carved) == 30


def test_local_dataset_directory(tmp_path):
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", numbered_rows(10))
    write_jsonl(tmp_path / "repo" / "validation.jsonl", numbered_rows(3, start=50))
    write_jsonl(tmp_path / "repo" / "test.jsonl", numbered_rows(4, start=80))
    source = DatasetSource(str(tmp_path / "repo"))
    assert [len(source.problems(s)) for s in SPLITS] == [10, 3, 4]


def test_gsm8k_style(tmp_path):
    source = DatasetSource(
        str(write_jsonl(tmp_path / "gsm8k.jsonl", [GSM8K_ROW])),
        fields={"prompt": "question"},
        answer_extractor="gsm8k",
        reference_from_answer=True,
        validation_fraction=0.01,
        test_fraction=0.01,
    )
    (problem,) = all_problems(source)
    assert problem.answer == "72"
    assert problem.reference.endswith("\\boxed{72}")
    assert "####" not in problem.reference
    assert problem.reference.startswith("Natalia sold 48/2")
    assert score_response(problem.reference, problem.answer) == 1.0
    assert score_response(problem.reference.replace("72}", "71}"), problem.answer) == 0.0


def test_mapped_reference_must_box_the_answer(tmp_path):
    rows = numbered_rows(3)
    for row in rows:
        row["solution"] = f"\\boxed{{{row['answer']}}}"
    rows[2]["solution"] = "\\boxed{999}"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 2: field 'reference' \(column 'solution'\)"):
        all_problems(DatasetSource(str(path), fields={"reference": "solution"}))


@pytest.mark.parametrize(
    ("bad_row", "kwargs", "field"),
    [
        ({"prompt": "x?"}, {}, "'answer'"),
        ({"prompt": "", "answer": "1"}, {}, "'prompt'"),
        ({"prompt": "   ", "answer": "1"}, {}, "'prompt'"),
        ({"prompt": "x?", "answer": None}, {}, "'answer'"),
        ({"prompt": "x?", "answer": "no marker"}, {"answer_extractor": "gsm8k"}, "'answer'"),
        ({"prompt": "x?", "answer": "none"}, {"answer_extractor": "last_number"}, "'answer'"),
        ({"prompt": "x?", "answer": "1", "level": "hard"}, {"fields": {"difficulty": "level"}}, "'difficulty'"),
        ({"prompt": "x?", "answer": "1", "level": 0}, {"fields": {"difficulty": "level"}}, "'difficulty'"),
    ],
)
def test_bad_row_names_row_and_field(tmp_path, bad_row, kwargs, field):
    rows = numbered_rows(2) + [bad_row]
    if "fields" in kwargs:
        rows[0]["level"] = rows[1]["level"] = 1
    if kwargs.get("answer_extractor") == "gsm8k":
        rows[0]["answer"] = rows[1]["answer"] = "#### 5"
    source = DatasetSource(str(write_jsonl(tmp_path / "d.jsonl", rows)), **kwargs)
    with pytest.raises(ValueError, match=r"row 2: field " + field) as error:
        source.problems("train")
    assert "d.jsonl" in str(error.value)


def test_missing_column_names_field_and_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_rows(3))
    with pytest.raises(ValueError, match=r"row 0: field 'skill' \(column 'topic'\): no such column"):
        DatasetSource(str(path), fields={"skill": "topic"}).problems("train")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_data_file_is_named(tmp_path, content):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ValueError, match=r"d.jsonl: the file is empty"):
        DatasetSource(str(tmp_path / "d.jsonl")).problems("train")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [('{"prompt": "What is 7 + 1?", "answer": "8"', r"line 3: not valid JSON"), ('["a list"]', r"line 3: expected a JSON object")],
)
def test_a_broken_json_line_is_named_with_its_number(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_rows(2))
    path.write_text(path.read_text() + bad_line + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl: " + message):
        DatasetSource(str(path)).problems("train")


def test_a_damaged_parquet_file_is_named(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 these are not the bytes of a table")
    with pytest.raises(ValueError, match=r"d.parquet: not a readable Parquet file"):
        DatasetSource(str(tmp_path / "d.parquet")).problems("train")


def test_an_empty_split_is_named(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered_rows(5))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), tmp_path / "test.parquet")
    source = DatasetSource(str(tmp_path / "train.jsonl"), splits={"test": "test.parquet"})
    with pytest.raises(ValueError, match=r"test.parquet: no rows"):
        source.problems("train")


def test_gsm8k_error_message(tmp_path):
    rows = [{"prompt": "a", "answer": "#### 1"}, {"prompt": "b", "answer": "#### 2"}, {"prompt": "c", "answer": "3"}]
    source = DatasetSource(str(write_jsonl(tmp_path / "d.jsonl", rows)), answer_extractor="gsm8k")
    with pytest.raises(ValueError, match=r"row 2: field 'answer' \(column 'answer'\): no '####' answer found"):
        source.problems("test")


def test_carving_is_disjoint_and_deterministic(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", numbered_rows(200)))
    source = DatasetSource(path, validation_fraction=0.2, test_fraction=0.2)
    prompts = {split: [p.prompt for p in source.problems(split)] for split in SPLITS}
    assert sum(map(len, prompts.values())) == 200
    for a, b in itertools.combinations(SPLITS, 2):
        assert set(prompts[a]).isdisjoint(prompts[b])
    assert all(len(prompts[s]) > 10 for s in SPLITS)
    again = DatasetSource(path, validation_fraction=0.2, test_fraction=0.2)
    assert all(source.problems(s) == again.problems(s) for s in SPLITS)
    reseeded = DatasetSource(path, validation_fraction=0.2, test_fraction=0.2, seed=1)
    assert reseeded.problems("validation") != source.problems("validation")
    assert {p.problem_id for p in all_problems(reseeded)} == {p.problem_id for p in all_problems(source)}


def test_carving_keeps_members_when_rows_are_added(tmp_path):
    small = DatasetSource(str(write_jsonl(tmp_path / "small.jsonl", numbered_rows(100))))
    large = DatasetSource(str(write_jsonl(tmp_path / "large.jsonl", numbered_rows(300))))
    for split in SPLITS:
        assert set(small.problems(split)) <= set(large.problems(split))


def test_explicit_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered_rows(10))
    write_jsonl(tmp_path / "heldout.jsonl", numbered_rows(4, start=100))
    source = DatasetSource(str(tmp_path / "train.jsonl"), splits={"test": "heldout.jsonl"}, validation_fraction=0.3)
    assert sorted(int(p.answer) for p in source.problems("test")) == [101, 102, 103, 104]
    assert len(source.problems("train")) + len(source.problems("validation")) == 10

    by_directory = DatasetSource(
        str(tmp_path), splits={"train": "train.jsonl", "validation": str(tmp_path / "heldout.jsonl")}
    )
    assert len(by_directory.problems("train")) + len(by_directory.problems("test")) == 10
    assert len(by_directory.problems("validation")) == 4


def test_explicit_split_names(tmp_path):
    datasets.DatasetDict(
        {
            "fit": datasets.Dataset.from_list(numbered_rows(8)),
            "dev": datasets.Dataset.from_list(numbered_rows(3, start=50)),
            "eval": datasets.Dataset.from_list(numbered_rows(2, start=90)),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    source = DatasetSource(str(tmp_path / "saved"), splits={"train": "fit", "validation": "dev", "test": "eval"})
    assert [len(source.problems(s)) for s in SPLITS] == [8, 3, 2]
    with pytest.raises(ValueError, match=r"splits.test: 'nope' is neither"):
        DatasetSource(str(tmp_path / "saved"), splits={"train": "fit", "test": "nope"}).problems("train")
    with pytest.raises(ValueError, match="none named 'train'"):
        DatasetSource(str(tmp_path / "saved")).problems("train")
    with pytest.raises(ValueError, match="more than one split"):
        DatasetSource(str(tmp_path / "saved"), splits={"train": "fit", "test": "fit"}).problems("train")


def test_repeated_prompts_get_distinct_ids(tmp_path):
    rows = numbered_rows(3) + numbered_rows(1)
    source = DatasetSource(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    ids = [p.problem_id for p in all_problems(source)]
    assert len(ids) == len(set(ids)) == 4


def test_repeated_mapped_ids_raise(tmp_path):
    rows = [{**row, "id": "same" if i in (0, 2) else str(i)} for i, row in enumerate(numbered_rows(3))]
    source = DatasetSource(str(write_jsonl(tmp_path / "d.jsonl", rows)), fields={"problem_id": "id"})
    with pytest.raises(ValueError, match=r"row 2: field 'problem_id'.*repeats"):
        source.problems("train")


def test_max_eval_per_skill(tmp_path):
    rows = [{**row, "skill": "ab"[i % 2]} for i, row in enumerate(numbered_rows(200))]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    source = DatasetSource(path, fields={"skill": "skill"}, max_eval_per_skill=3, validation_fraction=0.3)
    for split in ("validation", "test"):
        skills = [p.skill for p in source.problems(split)]
        assert skills.count("a") == skills.count("b") == 3


def test_problems_returns_a_new_list(tmp_path):
    source = DatasetSource(str(write_jsonl(tmp_path / "d.jsonl", numbered_rows(20))))
    source.problems("train").clear()
    assert source.problems("train")


def test_skill_graph_from_file(tmp_path):
    rows = [{**row, "skill": ["add", "carry", "mul"][i % 3]} for i, row in enumerate(numbered_rows(9))]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    graph_file = tmp_path / "graph.json"
    graph_file.write_text(json.dumps({"carry": ["add"], "mul": ["carry"]}))
    source = DatasetSource(path, fields={"skill": "skill"}, skill_graph_path=str(graph_file))
    assert source.skill_graph() == {"add": [], "carry": ["add"], "mul": ["carry"]}

    graph_file.write_text(json.dumps({"carry": ["add"], "mul": ["division"]}))
    source = DatasetSource(path, fields={"skill": "skill"}, skill_graph_path=str(graph_file))
    with pytest.raises(ValueError, match=r"graph.json names skill 'division'"):
        source.skill_graph()


def test_skill_graph_in_yaml_inline_or_in_a_file(tmp_path):
    rows = [{**row, "skill": ["add", "carry", "mul"][i % 3]} for i, row in enumerate(numbered_rows(9))]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    inline = DatasetSource(path, fields={"skill": "skill"}, skill_graph={"carry": ["add"], "mul": ["carry"]})
    assert inline.skill_graph() == {"add": [], "carry": ["add"], "mul": ["carry"]}
    graph_file = tmp_path / "graph.yaml"
    graph_file.write_text("carry: [add]\nmul:\n  - carry\n")
    assert DatasetSource(path, fields={"skill": "skill"}, skill_graph_path=str(graph_file)).skill_graph() == inline.skill_graph()
    with pytest.raises(ValueError, match=r"skill_graph names skill 'division'"):
        DatasetSource(path, fields={"skill": "skill"}, skill_graph={"mul": ["division"]}).skill_graph()
    with pytest.raises(ValueError, match=r"skill_graph has a cycle: add -> mul -> add"):
        DatasetSource(path, skill_graph={"add": ["mul"], "mul": ["add"]})
    with pytest.raises(ValueError, match="not both"):
        DatasetSource(path, skill_graph={}, skill_graph_path=str(graph_file))
    graph_file.write_text("carry: add\n")
    with pytest.raises(ValueError, match=r"graph.yaml must be a map"):
        DatasetSource(path, skill_graph_path=str(graph_file))


def test_skill_graph_cycle(tmp_path):
    graph_file = tmp_path / "graph.json"
    graph_file.write_text(json.dumps({"a": ["b"], "b": ["c"], "c": ["a"]}))
    path = str(write_jsonl(tmp_path / "d.jsonl", numbered_rows(2)))
    with pytest.raises(ValueError, match=r"skill_graph_path: .*graph.json has a cycle: a -> b -> c -> a"):
        DatasetSource(path, skill_graph_path=str(graph_file))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fields": {"question": "q"}}, "fields: unknown field 'question'"),
        ({"fields": {"prompt": ""}}, "fields.prompt"),
        ({"splits": {"dev": "dev.jsonl"}}, "splits: unknown split 'dev'"),
        ({"answer_extractor": "regex"}, "answer_extractor"),
        ({"prompt_template": "no placeholder"}, "prompt_template"),
        ({"prompt_template": "{prompt} \\boxed{}"}, "prompt_template"),
        ({"validation_fraction": 0.0}, "validation_fraction"),
        ({"validation_fraction": 0.6, "test_fraction": 0.4}, "validation_fraction"),
        ({"max_eval_per_skill": 0}, "max_eval_per_skill"),
        ({"skill_graph_path": "missing.json"}, "skill_graph_path"),
    ],
)
def test_bad_arguments_name_the_key(tmp_path, kwargs, message):
    path = str(write_jsonl(tmp_path / "d.jsonl", numbered_rows(2)))
    with pytest.raises(ValueError, match=message):
        DatasetSource(path, **kwargs)


def test_bad_path(tmp_path):
    with pytest.raises(ValueError, match="path: no such file"):
        DatasetSource(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="path: .*data.csv"):
        DatasetSource(str(tmp_path / "data.csv"))
