"""Build the offline multiple-choice HellaSwag file for lm-eval (task hellaswag_offline).

    python make_hellaswag_jsonl.py hellaswag_val_full.txt.bz2

Input (klosax/hellaswag_text_data, MIT): 6 lines per task: "activity label: context",
the gold ending's index (0-3), the 4 endings; 10,042 validation tasks in the
original order. Output: hellaswag_val_mc.jsonl.xz, one JSON object a line,
{"query": str, "choices": [4 str], "label": int}, xz-compressed UTF-8.

The texts get lm-eval's hellaswag preprocessing (lm_eval/tasks/hellaswag/utils.py):
query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
choices = preprocess(ending) for the 4 endings. The text file joins ctx_a and ctx_b
and keeps ctx_b lowercase, so ctx_b is taken to be the trailing unfinished sentence
of the context (text after the last ". ", "? " or "! " that ends without a full
stop): the sentence start that the endings complete in the ActivityNet tasks.
"""
import bz2
import hashlib
import json
import lzma
import re
import sys

OUTPUT = "hellaswag_val_mc.jsonl.xz"
_TRAILING_FRAGMENT = re.compile(r"(^|[.?!] )([^.?!]*[^.?!\s\"'])$")


def preprocess(text: str) -> str:
    """lm-eval's hellaswag preprocessing (WikiHow bracket tags, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def capitalize_ctx_b(context: str) -> str:
    """Apply lm-eval's ctx_b.capitalize() to the trailing unfinished sentence."""
    match = _TRAILING_FRAGMENT.search(context)
    if match is None:
        return context
    return context[:match.start(2)] + match.group(2).capitalize()


def tasks(path):
    """(query, choices, label) of each task in the text file."""
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    for i in range(0, len(lines) - 5, 6):
        context, gold, *endings = lines[i:i + 6]
        label, text = context.split(": ", 1)
        query = preprocess(f"{label}: {capitalize_ctx_b(text)}")
        yield query, [preprocess(ending) for ending in endings], int(gold)


def main(path):
    records = [{"query": query, "choices": choices, "label": label}
               for query, choices, label in tasks(path)]
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with lzma.open(OUTPUT, "wt", encoding="utf-8", preset=9) as out:
        out.write(text)
    data = text.encode("utf-8")
    print(f"{OUTPUT}: {len(records)} tasks, {len(data)} bytes decompressed, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1])
