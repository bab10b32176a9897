"""The contract every vector codebook follows, plus the shared plumbing.

A codebook maps each consecutive group of `codesz` weights (along the last
dimension) to one integer code and back:

    quantize(X) -> (X_hat, idx)   X: (..., d) float, d % codesz == 0
                                  X_hat: X's shape and dtype (the decoded points)
                                  idx: (..., d // codesz) int64, in [0, num_codes)
    decode(idx) -> X_hat          idx: (..., k) any integer dtype
                                  X_hat: (..., codesz * k) float32
    config()                      JSON-able kwargs of `get_codebook` that rebuild it

Class attributes: `name`, `codesz` (weights per code), `bits` (nominal bits
per weight), `opt_scale` (the scale s that minimises E||x - Q(s x)/s||^2 for
x ~ N(0, I)), `storage_dtype` (how codes are stored in checkpoints) and
`num_codes`.

What the quantization pipeline uses (the backend-neutral contract that every
backend's codebook offers; lib/algo, lib/linear and the CLIs call nothing else):

    block_width                   columns per LDLQ block (here codesz)
    check_shape(m, n)             UserInputError unless an m x n matrix can be quantized
    prepare()                     build what quantizing needs, before any work (here nothing)
    weight_rms(scale_override)    RMS the scaled weights get before quantization
    quantize_block(X)             X (B, m, block_width) -> (X_hat, block codes)
    join_block_codes(blocks)      the blocks' codes (first to last) -> (B, *code_shape(m, n))
    round_independently(X, chunk) X (..., m, n) rounded without error feedback (HARP's target)
    code_shape(m, n), storage_dtype   the code buffer of an m x n linear
    state_names, empty_state(), state()
                                  per-linear tensors stored with the codes (none here)
    bind(**state)                 the codebook with a linear's stored state (here: itself)
    decode_matrix(codes, m, n)    codes -> (m, n) float32

Subclasses implement `nearest_codes` (the per-chunk search on an (n, codesz)
matrix) and either a `grid` property (the (num_codes, codesz) float32 table of
all points, as E8P12 does) or `points_of` (code -> point, for codebooks too
large for a table), and override `config` when they have options. This base
class does the shape checks, the flattening, the chunking that bounds memory
and the per-device caching of tables; quantize and decode reach the points
only through `points_of`, so a codebook that overrides it needs no `grid`.
"""
import abc

import torch

from lib.utils.errors import UserInputError


class Codebook(abc.ABC):
    """Abstract vector codebook; see the module docstring for the contract."""

    name: str
    codesz: int
    bits: int
    opt_scale: float
    storage_dtype: torch.dtype
    num_codes: int
    state_names: tuple = ()
    cpu_chunk_rows: int = 1 << 10
    cuda_chunk_rows: int = 1 << 16

    def __init__(self):
        self._device_cache = {}

    @abc.abstractmethod
    def nearest_codes(self, vectors):
        """Codes (n,) int64 of the points chosen for the rows of `vectors` (n, codesz).

        The exact nearest point for single-stage codebooks; residual codebooks
        define their (greedy) rule. `vectors` is float32 or float64 and holds at
        most `chunk_rows` rows.
        """

    def points_of(self, codes):
        """float32 points (*codes.shape, codesz) of int64 codes in [0, num_codes).

        The result lies on the device of `codes`; quantize and decode both use it,
        so decode(quantize(X)[1]) reproduces X_hat bit for bit. Default: rows of
        the subclass's explicit `grid` table (E8P12); codebooks too large for a
        table (the residual ones) override this.
        """
        return self.grid_on(codes.device)[codes]

    def grid_on(self, device):
        """The subclass's (num_codes, codesz) float32 `grid` on `device` (copied there once)."""
        return self.cached_on("grid", device, self.grid.to)

    def config(self):
        """JSON-able kwargs of `lib.codebook.get_codebook` that return this codebook.

        Default for codebooks without options: just the name.
        """
        return {"name": self.name}

    def cached_on(self, key, device, build):
        """Return `build(device)`, built once per (key, device) and kept."""
        cache_key = (key, torch.device(device))
        if cache_key not in self._device_cache:
            self._device_cache[cache_key] = build(device)
        return self._device_cache[cache_key]

    def check_vectors(self, X):
        """Raise UserInputError unless X is a float tensor whose last dim splits into codes."""
        if not torch.is_tensor(X) or not X.is_floating_point():
            raise UserInputError(
                f"{self.name}.quantize needs a floating-point tensor, got "
                f"{getattr(X, 'dtype', type(X).__name__)}")
        if X.dim() == 0 or X.shape[-1] % self.codesz != 0:
            raise UserInputError(
                f"{self.name}.quantize needs the last dimension to be a multiple of "
                f"{self.codesz}, got shape {tuple(X.shape)}; pad or reshape the input")

    def chunk_rows(self, device):
        """Rows per chunk: small on CPU (the scores stay in cache), large on GPU."""
        return self.cuda_chunk_rows if device.type == "cuda" else self.cpu_chunk_rows

    def map_chunks(self, fn, vectors, chunk_rows=None):
        """Concatenate the int64 results of fn(chunk) over row chunks of `vectors`."""
        if vectors.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64, device=vectors.device)
        chunks = vectors.split(chunk_rows or self.chunk_rows(vectors.device))
        return torch.cat([fn(chunk) for chunk in chunks])

    def quantize(self, X, chunk_rows=None):
        """Round each group of `codesz` entries of X to a codebook point (`nearest_codes`).

        Returns (X_hat, idx): X_hat has X's shape and dtype, idx is int64 of
        shape (..., d // codesz). Distances are computed in float64 for float64
        input and in float32 otherwise. No gradient flows. `chunk_rows` vectors are
        searched at once (default: per device; bounds the memory of the search).
        """
        self.check_vectors(X)
        work_dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            vectors = X.detach().reshape(-1, self.codesz).to(work_dtype)
            codes = self.map_chunks(self.nearest_codes, vectors, chunk_rows)
            X_hat = self.points_of(codes).to(X.dtype).reshape(X.shape)
        return X_hat, codes.reshape(*X.shape[:-1], X.shape[-1] // self.codesz)

    # --- the pipeline contract (see the module docstring) -------------------------

    @property
    def block_width(self):
        """Columns per block of block LDLQ: one code per row and block."""
        return self.codesz

    def check_shape(self, m, n):
        """Raise UserInputError unless an m x n linear can be quantized with this codebook."""
        if n % self.codesz or m % 2:
            raise UserInputError(
                f"cannot quantize a {m} x {n} linear: the input size must be a multiple of the "
                f"codebook's vector size {self.codesz} and the output size even")

    def prepare(self):
        """Build what quantizing needs before any work starts; nothing here (QTIP: its
        code table, which may fail with a UserInputError)."""

    def weight_rms(self, scale_override):
        """RMS of the scaled weights the codebook sees: `scale_override` if > 0, else
        the codebook's opt_scale."""
        return scale_override if scale_override > 0 else self.opt_scale

    def quantize_block(self, X):
        """One LDLQ block X (B, m, block_width) -> (X_hat, codes (B, m, 1) int64)."""
        return self.quantize(X)

    def join_block_codes(self, blocks):
        """The codes of blocks 0..nb-1 (each from `quantize_block`) as (B, m, n / codesz)."""
        return torch.cat(blocks, dim=-1)

    def round_independently(self, X, chunk_rows=None):
        """X (..., m, n) with each row cut into vectors of codesz (zero-padded on the right)
        and each vector rounded on its own (no error feedback); the padding cropped."""
        n = X.shape[-1]
        pad = -n % self.codesz
        X_hat, _ = self.quantize(torch.nn.functional.pad(X, (0, pad)), chunk_rows=chunk_rows)
        return X_hat[..., :n]

    def code_shape(self, m, n):
        """Shape of the code buffer of an m x n linear."""
        return (m, n // self.codesz)

    def empty_state(self):
        """Per-linear tensors stored next to the codes (name -> zero tensor); none here."""
        return {}

    def state(self):
        """This codebook's values of those tensors (what a freshly quantized linear stores)."""
        return {}

    def bind(self, **state):
        """The codebook that decodes with a linear's stored state: itself (no state)."""
        return self

    def decode_matrix(self, codes, m, n):
        """The (m, n) float32 matrix of an m x n linear's codes."""
        return self.decode(codes).reshape(m, n)

    def codes_from_storage(self, idx):
        """int64 codes in [0, num_codes) from any integer dtype.

        `num_codes` is a power of two no larger than 2**(bits of storage_dtype),
        so masking with num_codes - 1 undoes the signed reinterpretation of
        stored codes (e.g. an int32-stored code >= 2**31 reads back negative).
        """
        if not torch.is_tensor(idx) or idx.is_floating_point() or idx.is_complex():
            raise UserInputError(
                f"{self.name}.decode needs an integer tensor of codes, got "
                f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() == 0:
            raise UserInputError(
                f"{self.name}.decode needs codes of shape (..., k), got a 0-d tensor; "
                "use idx.view(1)")
        return idx.to(torch.int64) & (self.num_codes - 1)

    def decode(self, idx):
        """Points of the codes idx (..., k) as float32 (..., codesz * k).

        The points of the k codes in the last dimension are concatenated, so a
        1-D idx of k codes gives a flat (codesz * k,) tensor and idx.view(-1, 1)
        gives one point per row.
        """
        codes = self.codes_from_storage(idx)
        points = self.points_of(codes)
        return points.reshape(*codes.shape[:-1], codes.shape[-1] * self.codesz)
