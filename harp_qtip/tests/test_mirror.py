"""Files shared with harp_quip are byte-for-byte copies (one source of truth)."""
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parents[1]
QUIP = BACKEND.parent / "harp_quip"
MIRRORED = ("lib/utils/errors.py",)


@pytest.mark.parametrize("relative", MIRRORED)
def test_mirrored_file_is_identical(relative):
    assert (BACKEND / relative).read_bytes() == (QUIP / relative).read_bytes(), (
        f"{relative} differs between harp_qtip and harp_quip; copy harp_quip's version over")
