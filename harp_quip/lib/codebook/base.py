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
