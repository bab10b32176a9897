"""Text data for calibration and perplexity evaluation.

Two kinds of text are used:

* Calibration sequences (Hessian estimation): upstream QuIP# samples
  `devset_size` RedPajama documents that fill `ctx_size` tokens
  (`lib/utils/data_utils.sample_rp1t`). Offline we use the WikiText-2
  VALIDATION split shipped in `harp_data/`, cut into non-overlapping windows,
  so that calibration never sees the test split.
* Perplexity windows: the WikiText-2 TEST split tokenized once and cut into
  non-overlapping windows (upstream `gptq_data_utils.get_wikitext2`), or C4
  windows drawn as in GPTQ's `get_c4` (hub only).

The Hugging Face hub is used when reachable (`source="auto"`), otherwise the
shipped copies in `harp_data/` (see harp_data/README.md). `datasets` is
imported lazily: the GPU machine does not have it.
"""
import bz2
import functools
import gzip
import lzma
import os
import random
import urllib.error
import urllib.request
from pathlib import Path

import glog
import torch

from lib.utils.errors import UserInputError

DATA_DIR_ENV = "HARP_DATA_DIR"
SOURCES = ("auto", "hub", "local")
SPLITS = ("train", "validation", "test")
TEXT_DATASETS = ("wikitext2", "hellaswag")
CALIBRATION_DATASETS = ("wikitext2", "redpajama", "c4")
EVAL_DATASETS = ("wikitext2", "hellaswag", "c4")

LOCAL_FILES = {
    ("wikitext2", "test"): "wikitext2_test.raw.xz",
    ("wikitext2", "validation"): "wikitext2_valid.tokens.xz",
    ("hellaswag", "test"): "hellaswag_ctx_test.txt.xz",
    ("hellaswag", "validation"): "hellaswag_ctx_valid.txt.xz",
}
HUB_TEXT = {"wikitext2": ("wikitext", "wikitext-2-raw-v1")}
HUB_DOCUMENTS = {
    "redpajama": {
        "path": "togethercomputer/RedPajama-Data-1T-Sample",
        "split": "train",
    },
    "c4": {
        "path": "allenai/c4",
        "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        "split": "validation",
    },
}
C4_EVAL_WINDOWS = 256
MAX_DRAWS_PER_ROW = 1000
HUB_PROBE_TIMEOUT_S = 5.0
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
COMPRESSED_SUFFIXES = tuple(_OPENERS)


class _HubUnavailable(Exception):
    """The hub could not be used; the message says why."""


def data_dir() -> Path:
    """The shipped data folder: $HARP_DATA_DIR, else <repo root>/harp_data."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[3] / "harp_data"


def read_text_file(path) -> str:
    """Read a UTF-8 text file, optionally .xz/.gz/.bz2 compressed.

    Universal newlines, so CRLF line ends (wiki.test.raw) become "\\n".
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(
            f"text file {path} does not exist; pass an existing .txt "
            f"(or .txt.xz/.gz/.bz2) file to --dataset_path")
    opener = _OPENERS.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read()


def _check_choice(value, choices, what):
    if value not in choices:
        raise UserInputError(
            f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _check_positive(value, flag):
    if value < 1:
        raise UserInputError(f"{flag} must be at least 1, got {value}")


def _hub_offline_reason() -> str | None:
    """Why the hub must not be tried (offline env var, no `datasets`), or None."""
    for name in OFFLINE_ENV:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    try:
        import datasets  # noqa: F401
    except ImportError:
        return "the `datasets` package is not installed"
    return None


@functools.lru_cache(maxsize=None)
def _hub_reachable() -> bool:
    """One quick HEAD request to the hub endpoint (once per process).

    `datasets` retries unreachable hosts for ~25 s; this probe makes the
    offline fallback immediate. Any HTTP answer counts as reachable.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        request = urllib.request.Request(endpoint, method="HEAD")
        urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def _hub_dataset(*args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)`, or _HubUnavailable."""
    reason = _hub_offline_reason()
    if reason is None and not _hub_reachable():
        reason = "the Hugging Face hub is not reachable"
    if reason is not None:
        raise _HubUnavailable(reason)
    import datasets
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:
        raise _HubUnavailable(f"{type(err).__name__}: {err}") from err


def _local_text(dataset: str, split: str) -> tuple[str, str]:
    name = LOCAL_FILES.get((dataset, split))
    if name is None:
        raise UserInputError(
            f"there is no shipped local copy of {dataset} {split}; pass the "
            f"text with --dataset_path FILE or allow hub access "
            f"(--data_source hub or auto)")
    path = data_dir() / name
    if not path.is_file():
        raise UserInputError(
            f"shipped data file {path} is missing; restore harp_data/ from the "
            f"repository or point ${DATA_DIR_ENV} at a copy")
    return read_text_file(path), f"local:{path}"


def load_text(dataset: str, split: str, source: str = "auto",
              dataset_path: str | None = None) -> tuple[str, str]:
    """Return (text, where it came from) for a text dataset split.

    `dataset_path` (a local text file) overrides everything. From the hub,
    the rows of wikitext-2-raw-v1 are joined with "\\n\\n" (QuIP#/GPTQ
    protocol); the shipped copy of the test split is wiki.test.raw, on which
    the reference SmolLM2 perplexity was measured.
    """
    if dataset_path is not None:
        return read_text_file(dataset_path), f"file:{Path(dataset_path).expanduser()}"
    _check_choice(dataset, TEXT_DATASETS, "text dataset")
    _check_choice(split, SPLITS, "split")
    _check_choice(source, SOURCES, "data source")
    if dataset not in HUB_TEXT:
        if source == "hub":
            raise UserInputError(f"{dataset} is built from a shipped file only (see harp_data/README.md); "
                                 f"use --data_source local or auto")
        return _local_text(dataset, split)
    if source != "local":
        hub_name, hub_config = HUB_TEXT[dataset]
        try:
            rows = _hub_dataset(hub_name, hub_config, split=split)
        except _HubUnavailable as err:
            if source == "hub":
                raise UserInputError(
                    f"cannot load {dataset} {split} from the hub ({err}); use "
                    f"--data_source local or auto, or --dataset_path FILE") from err
            glog.warning(f"hub unavailable for {dataset} {split} ({err}); "
                         f"using the shipped local copy")
        else:
            return "\n\n".join(rows["text"]), f"hub:{hub_name}/{hub_config}:{split}"
    return _local_text(dataset, split)


def tokenize(tokenizer, text: str) -> torch.LongTensor:
    """Token ids of the whole text, tokenized once with the tokenizer's defaults."""
    ids = tokenizer(text, verbose=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def split_windows(ids: torch.LongTensor, length: int) -> torch.LongTensor:
    """Cut 1-D ids into floor(N / length) non-overlapping windows (remainder dropped)."""
    count = ids.numel() // length
    if count == 0:
        raise UserInputError(
            f"the text has {ids.numel()} tokens, fewer than one window of "
            f"{length}; use a shorter --seqlen/--ctx_size or a longer text")
    return ids[:count * length].view(count, length)


def _hub_documents(dataset: str, source: str):
    """The document rows of a hub-only dataset, or a UserInputError."""
    if source == "local":
        raise UserInputError(
            f"{dataset} has no shipped local copy; use --data_source auto or "
            f"hub, or --dataset wikitext2 (shipped) or --dataset_path FILE")
    try:
        return _hub_dataset(**HUB_DOCUMENTS[dataset])
    except _HubUnavailable as err:
        raise UserInputError(
            f"{dataset} needs the Hugging Face hub ({err}); offline use "
            f"--dataset wikitext2 (shipped) or --dataset_path FILE") from err


def _draw_document(tokenizer, docs, rng: random.Random, min_tokens: int,
                   **tokenizer_kwargs) -> list[int]:
    """Token ids of the first randomly drawn document with >= min_tokens tokens."""
    for _ in range(MAX_DRAWS_PER_ROW):
        text = docs[rng.randint(0, len(docs) - 1)]["text"]
        ids = tokenizer(text, verbose=False, **tokenizer_kwargs).input_ids
        if len(ids) >= min_tokens:
            return ids
    raise UserInputError(
        f"none of {MAX_DRAWS_PER_ROW} randomly drawn documents has "
        f"{min_tokens} tokens; use a smaller --ctx_size/--seqlen")


def _sample_full_documents(tokenizer, docs, count: int, length: int,
                           rng: random.Random) -> torch.LongTensor:
    """Upstream QuIP# `sample_rp1t`: random documents (with replacement),
    truncated to `length` tokens; only those filling all `length` are kept."""
    rows = [_draw_document(tokenizer, docs, rng, length, truncation=True,
                           max_length=length) for _ in range(count)]
    return torch.tensor(rows, dtype=torch.long)


def get_calibration_sequences(tokenizer, dataset: str, devset_size: int,
                              ctx_size: int, seed: int = 0,
                              dataset_path: str | None = None,
                              source: str = "auto") -> tuple[torch.LongTensor, str]:
    """(devset_size, ctx_size) calibration token ids and their source.

    wikitext2 (VALIDATION split) and `dataset_path` files: the whole text is
    tokenized once, cut into non-overlapping windows, and `devset_size` of
    them are drawn without replacement (torch.Generator seeded by `seed`),
    kept in text order. redpajama / c4 follow upstream QuIP# (hub only).
    """
    _check_positive(devset_size, "--devset_size")
    _check_positive(ctx_size, "--ctx_size")
    if dataset_path is None:
        _check_choice(dataset, CALIBRATION_DATASETS, "calibration dataset")
    if dataset_path is not None or dataset == "wikitext2":
        text, where = load_text("wikitext2", "validation", source, dataset_path)
        windows = split_windows(tokenize(tokenizer, text), ctx_size)
        if windows.shape[0] < devset_size:
            raise UserInputError(
                f"{where} gives only {windows.shape[0]} windows of {ctx_size} "
                f"tokens, fewer than --devset_size {devset_size}; use a smaller "
                f"--devset_size or --ctx_size, or more text (--dataset_path)")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(windows.shape[0], generator=generator)[:devset_size]
        return windows[chosen.sort().values], where
    docs = _hub_documents(dataset, source)
    rows = _sample_full_documents(tokenizer, docs, devset_size, ctx_size,
                                  random.Random(seed))
    return rows, f"hub:{HUB_DOCUMENTS[dataset]['path']}"


def _c4_eval_windows(tokenizer, docs, seqlen: int) -> torch.LongTensor:
    """GPTQ `get_c4` protocol: random.Random(0); per window, random documents
    until one has more than `seqlen` tokens, then a random window in it."""
    rng = random.Random(0)
    windows = []
    for _ in range(C4_EVAL_WINDOWS):
        ids = _draw_document(tokenizer, docs, rng, seqlen + 1)
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def get_eval_windows(tokenizer, dataset: str, seqlen: int, source: str = "auto",
                     dataset_path: str | None = None,
                     split: str = "test") -> tuple[torch.LongTensor, str]:
    """(nwin, seqlen) perplexity windows and their source.

    wikitext2 and hellaswag (the out-of-domain text, shipped only; `split`: test for
    reporting, validation for choosing settings) and `dataset_path` files: tokenized
    once, cut into floor(N / seqlen) non-overlapping windows. c4: 256 windows of its
    validation shard (hub only).
    """
    _check_positive(seqlen, "--seqlen")
    if dataset_path is None:
        _check_choice(dataset, EVAL_DATASETS, "evaluation dataset")
    if dataset_path is not None or dataset in TEXT_DATASETS:
        text, where = load_text(dataset if dataset_path is None else "wikitext2", split, source,
                                dataset_path)
        return split_windows(tokenize(tokenizer, text), seqlen), where
    docs = _hub_documents(dataset, source)
    return _c4_eval_windows(tokenizer, docs, seqlen), f"hub:{HUB_DOCUMENTS[dataset]['path']}"
