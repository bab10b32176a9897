"""TrellisCodebook: the trellis on 16 x 16 tiles behind the pipeline's codebook contract
(tile order, block quantization and code layout, HARP's independent target, the
stored table, decoding), the registry and its flags, and the HYB table cache."""
import argparse

import pytest
import torch

from lib.codebook import (CLI_DEFAULTS, BitshiftTrellis, TrellisCodebook, add_codebook_arguments,
                          build_hyb_tlut, codebook_flags, codebook_from_flags, default_codebook_flags,
                          get_code, get_codebook)
from lib.codebook import hyb_table as hyb_cache
from lib.codebook.trellis import is_tailbiting, unpack
from lib.linear.quantized_linear import QuantizedLinear
from lib.utils.errors import UserInputError

SMALL = {"L": 8, "K": 2, "V": 1, "decode_mode": "1mad"}


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def table():
    return build_hyb_tlut(tlut_bits=4, seed=0, n_samples=1 << 12)


@pytest.fixture(scope="module")
def hyb(table):
    """A HYB codebook (L = 8, V = 2) bound to a small k-means table."""
    return TrellisCodebook(L=8, K=2, V=2, decode_mode="quantlut_sym", tlut_bits=4, tlut=table)


def test_tiles_are_row_major_16x16_blocks():
    cb = get_codebook(**SMALL)
    X = torch.arange(48 * 32.0).reshape(48, 32)
    tiles = cb.tiles_of(X)
    assert tiles.shape == (3, 2, 256)
    for i in range(3):
        for j in range(2):
            for r, c in ((0, 0), (0, 15), (5, 3), (15, 15)):
                assert tiles[i, j, 16 * r + c] == X[16 * i + r, 16 * j + c]
    assert torch.equal(cb.matrix_of(tiles), X)
    assert torch.equal(cb.matrix_of(cb.tiles_of(X.expand(2, 48, 32))), X.expand(2, 48, 32))


def test_contract_attributes():
    cb = get_codebook(**SMALL)
    assert (cb.name, cb.bits, cb.block_width, cb.storage_dtype) == ("bitshift", 2, 16, torch.int16)
    assert cb.code_shape(48, 32) == (6, 32)          # 6 tiles, T K / 16 = 32 words
    assert get_codebook(**SMALL, td_x=8).code_shape(48, 32) == (12, 16)
    assert cb.state_names == () and cb.empty_state() == {} and cb.bind() is cb
    cb.check_shape(48, 32)
    with pytest.raises(UserInputError, match="multiple of --td_x 16"):
        cb.check_shape(40, 32)
    with pytest.raises(UserInputError, match="--td_y 16"):
        cb.check_shape(48, 24)


def test_weight_rms_is_code_rms_times_scale_override():
    cb = get_codebook(**SMALL)
    rms = get_code("1mad").rms(8)
    assert cb.code_rms == pytest.approx(rms)
    assert cb.weight_rms(0.9) == pytest.approx(0.9 * rms)
    assert cb.weight_rms(-1.0) == cb.weight_rms(0) == pytest.approx(rms)


@pytest.mark.parametrize("codebook", ["mad", "hyb"])
def test_block_codes_layout_and_decode(codebook, hyb):
    """LDLQ's use: quantize the 16-column blocks one by one, join their codes. Row
    i (n/16) + j of the codes is tile (i, j)'s own bitstream (the quantizer on that tile
    alone gives the same words), and decode_matrix reproduces the blocks' X_hat."""
    cb = get_codebook(**SMALL) if codebook == "mad" else hyb
    m, n = 48, 64
    X = torch.randn(2, m, n, generator=gen(1)) * cb.code_rms
    hats, blocks = [], []
    for k in range(n // 16):
        X_hat, codes = cb.quantize_block(X[..., 16 * k:16 * (k + 1)])
        assert X_hat.shape == (2, m, 16) and codes.shape == (2, m // 16, cb.spec.words)
        hats.append(X_hat)
        blocks.append(codes)
    W_hat = torch.cat(hats, dim=-1)
    codes = cb.join_block_codes(blocks)
    assert codes.shape == (2, *cb.code_shape(m, n)) and codes.dtype == torch.int16
    single = BitshiftTrellis(cb.L, cb.K, cb.V, cb.code())
    tiles = cb.tiles_of(X)
    for i, j in ((0, 0), (1, 3), (2, 1)):
        _, alone = single.quantize(tiles[1, i, j][None])
        assert torch.equal(codes[1, i * (n // 16) + j], alone[0])
    for b in range(2):
        assert torch.equal(cb.decode_matrix(codes[b], m, n), W_hat[b])
        assert is_tailbiting(unpack(codes[b], cb.spec), cb.spec).all()
    assert ((X - W_hat) ** 2).mean() < 0.15 * (X**2).mean()


def test_round_independently_is_per_tile_viterbi_in_any_chunking():
    cb = get_codebook(**SMALL)
    X = torch.randn(2, 32, 48, generator=gen(2))
    T = cb.round_independently(X, chunk_rows=5)
    assert T.shape == X.shape
    assert torch.equal(T, cb.round_independently(X, chunk_rows=1000))
    tiles = cb.tiles_of(X).reshape(-1, 256)
    expected, _ = BitshiftTrellis(8, 2, 1, get_code("1mad")).quantize(tiles)
    assert torch.equal(cb.tiles_of(T).reshape(-1, 256), expected)


def test_linear_stores_and_decodes_with_its_table(hyb, table):
    """A QuantizedLinear of the HYB codebook keeps the table as buffer `tlut`; decoding
    uses that buffer (another table gives other weights), and a linear rebuilt from its
    config and state dict decodes identically."""
    from lib.incoherence import make_processor
    m, n = 32, 48
    config = hyb.config()
    assert config == {"name": "bitshift", "L": 8, "K": 2, "V": 2, "td_x": 16, "td_y": 16,
                      "decode_mode": "quantlut_sym", "tlut_bits": 4, "tlut_seed": 0}
    X = torch.randn(1, m, n, generator=gen(3))
    blocks = [hyb.quantize_block(X[..., 16 * k:16 * (k + 1)]) for k in range(n // 16)]
    W_hat = torch.cat([b[0] for b in blocks], dim=-1)[0]
    codes = hyb.join_block_codes([b[1] for b in blocks])[0]
    processor = make_processor("had", m, n, gen(0))
    linear = QuantizedLinear(n, m, config, processor.config())
    assert linear.tlut.shape == (16, 2) and not linear.tlut.any()
    linear.codebook = hyb                     # the quantizing codebook holds the run's table
    linear.load_quantized(codes, processor)
    assert torch.equal(linear.tlut, table)
    assert torch.equal(linear.decoded_weight(), W_hat)
    state = linear.state_dict()
    assert set(state) >= {"Qidxs", "tlut", "processor.SU", "processor.SV"}
    rebuilt = QuantizedLinear.from_config(linear.config())
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt.decoded_weight(), W_hat)
    rebuilt.tlut.mul_(-1)
    assert not torch.equal(rebuilt.decoded_weight(), W_hat)
    x = torch.randn(3, n, generator=gen(4))
    torch.testing.assert_close(linear(x), x @ linear.dequantize().T, rtol=1e-4, atol=1e-5)


def test_registry_shares_instances_and_round_trips_configs():
    cb = get_codebook(**SMALL)
    assert get_codebook(**cb.config()) is cb
    assert get_codebook(**SMALL, tlut_bits=9, tlut_seed=3) is cb     # no table: bits and seed unused
    assert codebook_from_flags({"codebook": "bitshift", **{k: v for k, v in cb.config().items()
                                                          if k != "name"}}) is cb
    assert default_codebook_flags() == {"codebook": "bitshift", "L": 16, "K": 2, "V": 2, "td_x": 16,
                                        "td_y": 16, "decode_mode": "quantlut_sym", "tlut_bits": 9,
                                        "tlut_seed": 0}


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "E8P12"}, "unknown codebook"),
    ({"decode_mode": "2mad"}, "unknown --decode_mode"),
    ({"decode_mode": "1mad", "V": 2}, "pass --V 1"),
    ({"decode_mode": "quantlut_sym", "V": 1}, "pass --V 2"),
    ({"L": 4, "K": 2, "V": 2}, "--L must be"),
    ({"L": 24}, "--L must be"),
    ({"tlut_bits": 0}, "--tlut_bits"),
    ({"K": 0}, "--K"),
    ({"td_x": 0}, "--td_x"),
    ({"L": 16.0}, "--L must be an integer"),
])
def test_bad_configs_fail_with_one_clear_error(kwargs, match):
    with pytest.raises(UserInputError, match=match):
        get_codebook(**kwargs)


def parse(argv):
    p = argparse.ArgumentParser()
    add_codebook_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quip_tune_iters", type=int, default=10)
    p.set_defaults(**{k: v for k, v in CLI_DEFAULTS.items() if k == "quip_tune_iters"})
    return p.parse_args(argv)


def test_flags_match_qtip_and_check_the_config():
    args = parse("--L 16 --K 2 --V 2 --td_x 16 --td_y 16 --decode_mode quantlut_sym --tlut_bits 9".split())
    assert codebook_flags(args) == default_codebook_flags()
    assert args.quip_tune_iters == 0                      # QTIP has no LDLQ tune passes
    assert codebook_flags(parse(["--seed", "4"]))["tlut_seed"] == 4
    flags = codebook_flags(parse("--decode_mode 3inst --V 1 --K 3".split()))
    assert (flags["decode_mode"], flags["tlut_bits"], flags["tlut_seed"], flags["K"]) == ("3inst", 0, 0, 3)
    with pytest.raises(UserInputError, match="pass --V 1"):
        codebook_flags(parse("--decode_mode 1mad".split()))


def test_hyb_table_is_cached_on_disk(hyb_table_cache):
    path = hyb_cache.cache_file(3, 7, 1 << 12)
    assert path.parent == hyb_table_cache and not path.exists()
    first = hyb_cache.hyb_table(3, 7, 1 << 12)
    assert torch.equal(first, build_hyb_tlut(3, 7, 1 << 12)) and path.is_file()
    assert torch.equal(torch.load(path, weights_only=True), first)
    path.write_bytes(b"damaged")
    assert torch.equal(hyb_cache.hyb_table(3, 7, 1 << 12), first)      # rebuilt, not trusted
    torch.save(torch.zeros(8, 2), path)
    assert torch.equal(hyb_cache.hyb_table(3, 7, 1 << 12), first)


@pytest.mark.gpu
def test_gpu_blocks_at_l16_match_the_cpu():
    """The paper's config (L 16, K 2, V 2, HYB with 2^9 points) on CUDA: decode equals the
    quantizer's output, and the error equals the CPU's (2 %: float sums in another order
    may pick another near-optimal path)."""
    table = build_hyb_tlut(tlut_bits=9, seed=1, n_samples=1 << 16)
    cb = TrellisCodebook(L=16, K=2, V=2, decode_mode="quantlut_sym", tlut_bits=9, tlut=table)
    X = torch.randn(1, 64, 16, generator=gen(8)) * cb.code_rms
    cpu_hat, _ = cb.quantize_block(X)
    gpu_hat, codes = cb.quantize_block(X.cuda())
    assert torch.equal(cb.bind(tlut=table.cuda()).decode_matrix(codes[0], 64, 16), gpu_hat[0])
    err_cpu = ((X - cpu_hat) ** 2).mean().item()
    err_gpu = ((X.cuda() - gpu_hat) ** 2).mean().item()
    assert err_gpu == pytest.approx(err_cpu, rel=0.02)
    assert err_gpu < 0.08 * cb.code_rms ** 2
