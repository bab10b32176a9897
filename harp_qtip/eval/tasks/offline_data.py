"""Documents of our offline lm-eval tasks (the *_offline.yaml files of this folder).

Each task's data is one shipped file in harp_data (or $HARP_DATA_DIR), one JSON
object a line, xz-compressed; it is read here with lzma, so neither the hub nor
the `datasets` json loader is involved. The YAMLs name the `load_*` hooks below
as `custom_dataset`; lm-eval calls them with the task metadata as keyword
arguments, which the documents do not depend on. Every task has a single
"validation" split.

    task                   file                         rows   built by (harp_data/)
    hellaswag_offline      hellaswag_val_mc.jsonl.xz    10042  make_hellaswag_jsonl.py
    arc_challenge_offline  arc_challenge_val.jsonl.xz     299  make_zeroshot_jsonl.py
    arc_easy_offline       arc_easy_val.jsonl.xz          570  make_zeroshot_jsonl.py
    piqa_offline           piqa_val.jsonl.xz             1838  make_zeroshot_jsonl.py
    winogrande_offline     winogrande_val.jsonl.xz       1267  make_zeroshot_jsonl.py

ARC is its *validation* split here (lm-eval's arc_challenge/arc_easy use test).

The winogrande_* functions are the WinoGrande prompt (partial evaluation, as in
lm-eval's winogrande): the sentence is cut at its blank "_"; each option
completes the prefix into one context, and the text after the blank is the
shared continuation scored under both contexts.
"""
import json
import lzma

import datasets

from lib.utils.data import DATA_DIR_ENV, data_dir
from lib.utils.errors import UserInputError

# task -> (shipped file, the harp_data script that builds it)
DATA_FILES = {
    "hellaswag_offline": ("hellaswag_val_mc.jsonl.xz", "make_hellaswag_jsonl.py"),
    "arc_challenge_offline": ("arc_challenge_val.jsonl.xz", "make_zeroshot_jsonl.py"),
    "arc_easy_offline": ("arc_easy_val.jsonl.xz", "make_zeroshot_jsonl.py"),
    "piqa_offline": ("piqa_val.jsonl.xz", "make_zeroshot_jsonl.py"),
    "winogrande_offline": ("winogrande_val.jsonl.xz", "make_zeroshot_jsonl.py"),
}


def read_records(task: str) -> list[dict]:
    """All documents of an offline task's shipped file, in the original order."""
    file_name, script = DATA_FILES[task]
    path = data_dir() / file_name
    if not path.is_file():
        raise UserInputError(
            f"the data of offline task {task}, {path}, is missing; restore "
            f"harp_data/{file_name} from the repository (built by harp_data/{script}) "
            f"or point {DATA_DIR_ENV} at a folder that holds it")
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def load_task(task: str) -> datasets.DatasetDict:
    """The task's documents as lm-eval expects them: one "validation" split."""
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(read_records(task))})


# lm-eval `custom_dataset` hooks, one per YAML.
def load_hellaswag(**_metadata) -> datasets.DatasetDict:
    return load_task("hellaswag_offline")


def load_arc_challenge(**_metadata) -> datasets.DatasetDict:
    return load_task("arc_challenge_offline")


def load_arc_easy(**_metadata) -> datasets.DatasetDict:
    return load_task("arc_easy_offline")


def load_piqa(**_metadata) -> datasets.DatasetDict:
    return load_task("piqa_offline")


def load_winogrande(**_metadata) -> datasets.DatasetDict:
    return load_task("winogrande_offline")


# WinoGrande partial evaluation (doc_to_text / doc_to_choice / doc_to_target).
def winogrande_gold(doc: dict) -> int:
    """Index of the correct option ("1" or "2" -> 0 or 1); an int tells lm-eval
    that the choices are contexts rather than continuations."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_contexts(doc: dict) -> list[str]:
    """The sentence up to its blank, completed with option1 and with option2."""
    prefix = doc["sentence"][:doc["sentence"].index("_")]
    return [prefix + doc["option1"], prefix + doc["option2"]]


def winogrande_continuation(doc: dict) -> str:
    """The sentence after its blank, stripped (lm-eval adds the " " delimiter)."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()
