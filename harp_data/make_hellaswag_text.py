"""Build the out-of-domain perplexity texts from the HellaSwag validation set.

    python make_hellaswag_text.py hellaswag_val_full.txt.bz2

Input (klosax/hellaswag_text_data, MIT): 6 lines per task: "activity label: context",
the gold ending's index (0-3), the 4 endings. Each task becomes one paragraph,
context + gold ending (ActivityNet captions and WikiHow how-to steps: not Wikipedia).
The activity labels, sorted by name, go alternately to a validation text (for
choosing settings) and a test text (for reporting), so the two share no topic.
Paragraphs are joined with a blank line; files are xz-compressed UTF-8.
"""
import bz2
import lzma
import sys


def paragraphs(path):
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    for i in range(0, len(lines) - 5, 6):
        context, gold, *endings = lines[i:i + 6]
        label, text = context.split(": ", 1)
        yield label, f"{text} {endings[int(gold)]}".strip()


def main(path):
    tasks = list(paragraphs(path))
    labels = sorted({label for label, _ in tasks})
    split_of = {label: ("valid", "test")[k % 2] for k, label in enumerate(labels)}
    for split in ("valid", "test"):
        text = "\n\n".join(p for label, p in tasks if split_of[label] == split) + "\n"
        with lzma.open(f"hellaswag_ctx_{split}.txt.xz", "wt", encoding="utf-8", preset=9) as out:
            out.write(text)
        count = sum(split_of[label] == split for label, _ in tasks)
        print(f"hellaswag_ctx_{split}.txt.xz: {count} paragraphs, {len(text)} characters")


if __name__ == "__main__":
    main(sys.argv[1])
