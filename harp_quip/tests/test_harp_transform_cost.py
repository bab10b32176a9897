"""eval.harp_transform_cost: the rotation swap and the CLI (tiny synthetic models, CPU)."""
import json

import pytest
import torch

from eval import harp_transform_cost
from lib.incoherence.harp import StructuredRotation
from lib.incoherence.rht import HadamardRotation
from lib.utils.hadamard import hadamard_transform
from model.decoder import SITE_LAYOUT
from model.quantized_llama import site_linear
from model.synthetic import synthetic_llama
from tiny_llama import cli_fails

SIDES = [(site, side) for site in SITE_LAYOUT for side in ("input", "output")]


@pytest.fixture(scope="module")
def tiny_harp():
    return synthetic_llama("tiny", "harp", dtype=torch.float32)


def test_swapped_linear_applies_hadamards_and_the_originals_come_back(tiny_harp):
    linear = site_linear(tiny_harp.model.layers[1], "up")
    processor = linear.processor
    originals = (processor.right, processor.left)
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = linear(x)
        with harp_transform_cost.hadamard_instead(tiny_harp, [("up", "input"), ("up", "output")]):
            assert isinstance(processor.right, HadamardRotation) and isinstance(processor.left, HadamardRotation)
            swapped = linear(x)
            # the had processor's product, from the Hadamard transform itself
            rows = hadamard_transform(x * processor.SU, transpose=True) @ linear.decoded_weight().T
            expected = hadamard_transform(rows, transpose=False) * processor.SV
        after = linear(x)
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-6)
    assert (swapped - before).abs().max() > 1e-3 * before.abs().max()
    assert torch.equal(after, before)
    assert (processor.right, processor.left) == originals


def test_swap_touches_only_the_named_side_and_every_layer(tiny_harp):
    with harp_transform_cost.hadamard_instead(tiny_harp, [("o", "output")]):
        for layer in tiny_harp.model.layers:
            for site, side in SIDES:
                rotation = getattr(site_linear(layer, site).processor, harp_transform_cost.SIDES[side])
                swapped = (site, side) == ("o", "output")
                assert isinstance(rotation, HadamardRotation if swapped else StructuredRotation)


def test_swap_refuses_a_had_model():
    model = synthetic_llama("tiny", "had", dtype=torch.float32)
    with pytest.raises(ValueError, match="not HARP's.*harp model"):
        with harp_transform_cost.hadamard_instead(model, [("qkv", "input")]):
            pass


@pytest.mark.parametrize("n, side, launches", [(4096, "input", 2), (4096, "output", 2),
                                                (22016, "output", 3), (11008, "input", 2)])
def test_launch_counts_follow_the_rotation_plan(n, side, launches):
    """Llama-2-7B sizes (transform_kernels.rotation_plan's docstring and README)."""
    assert harp_transform_cost.rotation_launches(StructuredRotation(n), side) == launches


def test_cli_writes_every_site_and_side(tmp_path, capsys):
    out = tmp_path / "cost.json"
    result = harp_transform_cost.main(["--synthetic", "tiny", "--device", "cpu", "--new_tokens", "3",
                                       "--samples", "1", "--rounds", "1", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["shape"] == "tiny" and saved["layers"] == 2
    assert [(r["site"], r["side"]) for r in saved["sites"]] == SIDES
    assert set(saved["ms_per_step"]) == {"had", "harp", "harp, every rotation swapped"}
    assert all(ms > 0 for ms in saved["ms_per_step"].values())
    for row in saved["sites"]:
        assert row["size"] == (row["n"] if row["side"] == "input" else row["m"])
        assert row["harp_launches"] >= 1 and row["ms_per_step_swapped"] > 0
        expected = 1000 * (saved["ms_per_step"]["harp"] - row["ms_per_step_swapped"]) / 2
        assert row["us_per_layer"] == pytest.approx(expected)
    assert result["sites"] == saved["sites"]
    printed = capsys.readouterr().out
    assert "sum of the rows" in printed and "us per layer" in printed

    harp_transform_cost.main(["--table", str(out), str(out)])
    lines = capsys.readouterr().out.splitlines()
    first = saved["sites"][0]
    assert lines[0].startswith("| site | side | tiny: size (launches) | tiny: µs / layer | tiny:")
    assert lines[2] == (f"| qkv | input | {first['size']} ({first['harp_launches']}) | {first['us_per_layer']:.1f} "
                        f"| {first['size']} ({first['harp_launches']}) | {first['us_per_layer']:.1f} |")
    assert f"| harp |  | {saved['ms_per_step']['harp']:.3f} |" in lines[-4]


@pytest.mark.parametrize("argv, pattern", [
    (["--synthetic", "llama3"], "unknown synthetic shape"),
    (["--synthetic", "tiny", "--rounds", "0"], "--rounds must be >= 1"),
    (["--synthetic", "tiny", "--new_tokens", "1"], "--new_tokens must be >= 2"),
    ([], "pass --synthetic SHAPE to time, or --table"),
    (["--synthetic", "tiny", "--table", "a.json"], "pass --synthetic SHAPE to time, or --table"),
    (["--table", "missing.json"], "missing.json does not exist"),
])
def test_bad_flags_exit_with_one_error(argv, pattern, caplog):
    cli_fails(caplog, harp_transform_cost.main, argv, pattern)


def test_table_refuses_a_foreign_json(tmp_path, caplog):
    foreign = tmp_path / "speed.json"
    foreign.write_text(json.dumps({"results": []}))
    cli_fails(caplog, harp_transform_cost.main, ["--table", str(foreign)],
              "is not an eval.harp_transform_cost --output JSON")
