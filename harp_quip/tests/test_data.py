import lzma
from types import SimpleNamespace

import pytest
import torch

from fixtures_real_model import smollm2  # noqa: F401
from lib.utils import data
from lib.utils.errors import UserInputError

TEST_TOKENS = 301_948
VALIDATION_TOKENS = 273_868


class CharTokenizer:
    """One token per character: enough to test windowing and file handling."""

    def __call__(self, text, truncation=False, max_length=None, verbose=True):
        ids = [ord(char) for char in text]
        return SimpleNamespace(input_ids=ids[:max_length] if truncation else ids)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_shipped_files_are_found():
    for name in data.LOCAL_FILES.values():
        assert (data.data_dir() / name).is_file()


def test_validation_text_is_not_the_test_text():
    test_text, test_where = data.load_text("wikitext2", "test", source="local")
    valid_text, valid_where = data.load_text("wikitext2", "validation", source="local")
    assert test_where.endswith("wikitext2_test.raw.xz")
    assert valid_where.endswith("wikitext2_valid.tokens.xz")
    assert "\r" not in test_text
    assert "<unk>" in valid_text and "<unk>" not in test_text
    assert valid_text[1000:1200] not in test_text


def test_auto_falls_back_to_local_when_offline(offline):
    text, where = data.load_text("wikitext2", "test", source="auto")
    assert where.startswith("local:") and len(text) > 1_000_000


def test_hub_source_offline_raises(offline):
    with pytest.raises(UserInputError, match="--data_source local"):
        data.load_text("wikitext2", "test", source="hub")


@pytest.mark.parametrize("dataset", ["c4", "redpajama"])
def test_hub_only_calibration_offline_raises(offline, dataset):
    with pytest.raises(UserInputError, match="needs the Hugging Face hub"):
        data.get_calibration_sequences(CharTokenizer(), dataset, 4, 16, source="hub")


def test_c4_eval_offline_raises(offline):
    with pytest.raises(UserInputError, match="needs the Hugging Face hub"):
        data.get_eval_windows(CharTokenizer(), "c4", 16)
    with pytest.raises(UserInputError, match="no shipped local copy"):
        data.get_eval_windows(CharTokenizer(), "c4", 16, source="local")


def test_hub_rows_are_joined_like_upstream(monkeypatch):
    calls = []

    def fake_hub(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": [" = Title = \n", "", " Body line . \n"]}

    monkeypatch.setattr(data, "_hub_dataset", fake_hub)
    text, where = data.load_text("wikitext2", "test", source="hub")
    assert text == " = Title = \n\n\n\n\n Body line . \n"
    assert where == "hub:wikitext/wikitext-2-raw-v1:test"
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


def test_auto_falls_back_when_load_dataset_fails(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def failing_load(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setattr(data, "_hub_offline_reason", lambda: None)
    monkeypatch.setattr(data, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", failing_load)
    _, where = data.load_text("wikitext2", "validation", source="auto")
    assert where.endswith("wikitext2_valid.tokens.xz")
    with pytest.raises(UserInputError, match="Couldn't reach"):
        data.load_text("wikitext2", "validation", source="hub")


def fake_documents(monkeypatch):
    docs = [{"text": "x" * length} for length in (5, 40, 100, 7, 64, 300)]
    monkeypatch.setattr(data, "_hub_dataset", lambda **kwargs: docs)
    return docs


def test_redpajama_keeps_only_full_documents(monkeypatch):
    fake_documents(monkeypatch)
    rows, where = data.get_calibration_sequences(CharTokenizer(), "redpajama", 12, 64, seed=3)
    assert where == "hub:togethercomputer/RedPajama-Data-1T-Sample"
    assert rows.shape == (12, 64) and bool((rows == ord("x")).all())
    again, _ = data.get_calibration_sequences(CharTokenizer(), "redpajama", 12, 64, seed=3)
    assert torch.equal(rows, again)
    with pytest.raises(UserInputError, match="smaller --ctx_size"):
        data.get_calibration_sequences(CharTokenizer(), "c4", 1, 1000)


def test_c4_eval_windows_follow_gptq(monkeypatch):
    docs = fake_documents(monkeypatch)
    docs[:] = [{"text": "".join(chr(65 + (i * 7 + j) % 50) for j in range(length))}
               for i, length in enumerate((5, 40, 100, 7, 64, 300))]
    windows, where = data.get_eval_windows(CharTokenizer(), "c4", 64)
    assert where == "hub:allenai/c4" and windows.shape == (256, 64)
    longer_docs = [doc["text"] for doc in docs if len(doc["text"]) > 64]
    texts = ["".join(map(chr, window.tolist())) for window in windows]
    assert all(any(text in doc for doc in longer_docs) for text in texts)
    again, _ = data.get_eval_windows(CharTokenizer(), "c4", 64)
    assert torch.equal(windows, again)


def test_train_split_has_no_local_copy():
    with pytest.raises(UserInputError, match="--dataset_path"):
        data.load_text("wikitext2", "train", source="local")


def test_bad_choices_raise():
    with pytest.raises(UserInputError, match="split"):
        data.load_text("wikitext2", "dev", source="local")
    with pytest.raises(UserInputError, match="data source"):
        data.load_text("wikitext2", "test", source="web")
    with pytest.raises(UserInputError, match="calibration dataset"):
        data.get_calibration_sequences(CharTokenizer(), "pile", 4, 16)


def test_data_dir_override(monkeypatch, tmp_path):
    with lzma.open(tmp_path / "wikitext2_test.raw.xz", "wt", encoding="utf-8") as handle:
        handle.write("abc\r\ndef\r\n")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    text, where = data.load_text("wikitext2", "test", source="local")
    assert text == "abc\ndef\n" and str(tmp_path) in where


@pytest.mark.parametrize("name", ["sample.txt", "sample.txt.xz"])
def test_dataset_path_windows(tmp_path, name):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / name
    opener = lzma.open if name.endswith(".xz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write(text)
    windows, where = data.get_eval_windows(CharTokenizer(), "wikitext2", 64,
                                           dataset_path=str(path))
    assert where == f"file:{path}"
    assert windows.shape == (15, 64) and windows.dtype == torch.long
    assert "".join(map(chr, windows.flatten().tolist())) == text[:960]
    sequences, _ = data.get_calibration_sequences(CharTokenizer(), "wikitext2", 5, 100,
                                                  dataset_path=str(path))
    assert sequences.shape == (5, 100)


def test_missing_dataset_path_raises(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserInputError, match=str(missing)):
        data.get_eval_windows(CharTokenizer(), "wikitext2", 64, dataset_path=str(missing))


def test_text_shorter_than_one_window_raises(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(UserInputError, match="fewer than one window"):
        data.get_eval_windows(CharTokenizer(), "wikitext2", 64, dataset_path=str(path))


@pytest.mark.slow
def test_test_split_tokens_and_windows(smollm2):  # noqa: F811
    _, tokenizer = smollm2
    text, _ = data.load_text("wikitext2", "test", source="local")
    ids = data.tokenize(tokenizer, text)
    assert ids.numel() == TEST_TOKENS
    windows, where = data.get_eval_windows(tokenizer, "wikitext2", 2048, source="local")
    assert where.endswith("wikitext2_test.raw.xz")
    assert windows.shape == (147, 2048)
    assert torch.equal(windows.flatten(), ids[:147 * 2048])


@pytest.mark.slow
def test_calibration_sequences_from_validation(smollm2):  # noqa: F811
    _, tokenizer = smollm2
    first, where = data.get_calibration_sequences(tokenizer, "wikitext2", 8, 256, seed=0,
                                                  source="local")
    again, _ = data.get_calibration_sequences(tokenizer, "wikitext2", 8, 256, seed=0,
                                              source="local")
    other, _ = data.get_calibration_sequences(tokenizer, "wikitext2", 8, 256, seed=1,
                                              source="local")
    assert first.shape == (8, 256) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert where.endswith("wikitext2_valid.tokens.xz")
    valid_text, _ = data.load_text("wikitext2", "validation", source="local")
    decoded = tokenizer.decode(first[3])
    assert decoded[10:-10] in valid_text
    with pytest.raises(UserInputError, match=f"only {VALIDATION_TOKENS // 2048} windows"):
        data.get_calibration_sequences(tokenizer, "wikitext2", 1000, 2048, source="local")


@pytest.mark.slow
def test_out_of_domain_text_is_shipped_split_and_local_only(smollm2):  # noqa: F811
    _, tokenizer = smollm2
    test_text, where = data.load_text("hellaswag", "test")
    valid_text, _ = data.load_text("hellaswag", "validation")
    assert where.startswith("local:") and where.endswith("hellaswag_ctx_test.txt.xz")
    assert not set(test_text.split("\n\n")[:200]) & set(valid_text.split("\n\n"))
    windows, _ = data.get_eval_windows(tokenizer, "hellaswag", 2048)
    assert windows.shape == (415749 // 2048, 2048)
    with pytest.raises(UserInputError, match="shipped file only"):
        data.load_text("hellaswag", "test", source="hub")
