"""HARP: a learnable, structured, two-sided orthogonal incoherence processor.

Backend-agnostic core (mirrored byte for byte into every backend). A rotation R of
size n is a product of sparse block-orthogonal stages (mixed-radix schedule,
stride ordering); each block is a Cayley rotation of learnable skew parameters
times a fixed mixer (Hadamard, QR or identity). At theta = 0 with power-of-two
radices R is the normalized Sylvester Hadamard, i.e. exactly QuIP#'s RHT core; with
`kron_fallback` a learnable power-of-two rotation is combined with the RHT's K x K
Hadamard, so any supported n starts exactly at the RHT.

The processor fits R_v (input side, size n) and R_u (output side, size m) to one
linear layer by Adam on a proxy of the quantization error:
    W~ = R_u^T (SV W SU) R_v,  H~ = R_v^T (SU H SU) R_v,
    loss = mean_ij h_j (W~_ij / s - T_ij)^2 + lambda * ||offblock(H~)||^2 / n^2 + L2(theta),
with T = the backend's quantization of W~ / s (no gradient, refreshed every k steps)
and h = |diag H~| / mean. The backend then quantizes W~ with H~ as it would an
RHT-processed weight. Orientation: `transform(x) = x R`, `inverse_transform(x) = x R^T`.
"""
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lib.incoherence.base import IncoherenceProcessor, OrthogonalTransform
from lib.utils.errors import UserInputError
from lib.utils.hadamard import hadamard_factor, hadamard_matrix

MIXERS = ("had_or_qr", "had_or_ident", "identity", "qr")
CLI_MIXERS = ("had_or_qr", "had_or_ident", "identity")
ORDERING_MODES = ("stride",)
STRATEGIES = ("proxy", "ldlq")
MIXER_BASE_SEED = 0
HBD_MAX_N = 24672


def radix_schedule(n, b=8, max_b=8):
    """Greedy mixed-radix factorization of n: divide by b while it divides, then by
    f = min(max_b, rest) .. 2 while each divides; a remaining factor > 1 (all its
    primes exceed max_b) becomes one last stage. 576 -> [8, 8, 3, 3]; 11008 -> [8, 8, 4, 43]."""
    if n < 1:
        raise UserInputError(f"a rotation needs size >= 1, got {n}")
    if n == 1:
        return [1]
    stages, rest = [], n
    if b >= 2:
        while rest % b == 0:
            stages.append(b)
            rest //= b
    for f in range(min(max_b, rest), 1, -1):
        while rest % f == 0:
            stages.append(f)
            rest //= f
    if rest > 1:
        stages.append(rest)
    return stages


def _is_power_of_two(k):
    return k >= 1 and k & (k - 1) == 0


def make_mixer(b, kind):
    """The fixed orthogonal b x b mixer M_b of a stage (float32).

    had: normalized Sylvester Hadamard (power-of-two b); qr: Q of the QR decomposition of
    a standard Gaussian b x b drawn from a CPU generator seeded MIXER_BASE_SEED + 10007 b,
    columns multiplied by sign(diag R) (zero counted as +1)."""
    if kind not in MIXERS:
        raise UserInputError(f"unknown HARP mixer {kind!r}; choose one of {', '.join(CLI_MIXERS)}")
    if kind == "identity" or b == 1:
        return torch.eye(b)
    if _is_power_of_two(b) and kind in ("had_or_qr", "had_or_ident"):
        return hadamard_matrix(b) / math.sqrt(b)
    if kind == "had_or_ident":
        return torch.eye(b)
    g = torch.Generator().manual_seed(MIXER_BASE_SEED + 10007 * b)
    Q, R = torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float32))
    return Q * torch.where(R.diagonal() >= 0, 1.0, -1.0)[None, :]


def cayley(S):
    """Q(S) = (I + S)^{-1} (I - S): orthogonal for skew-symmetric S, Q(0) = I."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    return torch.linalg.solve_ex(eye + S, eye - S)[0]   # I + S is never singular: no check, no sync


def givens(angle):
    """[[cos a, -sin a], [sin a, cos a]] per angle."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def apply_stage(x, blocks, stride, transpose=False):
    """v <- K_g v (or K_g^T v) for every stride group of the rows of x (L, R, n), with one
    set of blocks (L, n / b, b, b) per batch element.

    Index i = c (b s) + j s + r: the b coordinates sharing (c, r) form group g = c s + r
    (ordered by the digit j). Costs O(n b) per row."""
    L, R, n = x.shape
    n_blocks, b = blocks.shape[1], blocks.shape[2]
    C = n_blocks // stride
    xs = x.reshape(L, R, C, b, stride).permute(0, 2, 4, 1, 3)
    K = blocks.reshape(L, C, stride, b, b)
    ys = xs @ (K if transpose else K.transpose(-1, -2))
    return ys.permute(0, 3, 1, 4, 2).reshape(L, R, n)


@dataclass
class RotationOptions:
    """Structure of the HARP rotations (the `--harp_*` structure flags). `stage_bs` is a
    list of explicit schedules; a rotation uses the one that multiplies to its size
    (the greedy `radix_schedule` otherwise)."""
    b: int = 8
    max_b: int = 8
    stage_bs: list = None
    passes: int = 1
    ordering_mode: str = "stride"
    fixed_mixer: str = "had_or_qr"
    use_givens_b2: bool = False
    theta_init_scale: float = 0.0
    theta_clip: float = None
    kron_fallback: bool = False

    def check(self):
        if self.b < 1 or self.max_b < 1:
            raise UserInputError(f"--harp_b and --harp_max_b must be >= 1, got {self.b}, {self.max_b}")
        if self.passes < 1:
            raise UserInputError(f"--harp_passes must be >= 1, got {self.passes}")
        if self.ordering_mode not in ORDERING_MODES:
            raise UserInputError(f"unknown --harp_ordering_mode {self.ordering_mode!r}; "
                                 f"the only mode is {', '.join(ORDERING_MODES)}")
        if self.fixed_mixer not in MIXERS:
            raise UserInputError(f"unknown --harp_fixed_mixer {self.fixed_mixer!r}; "
                                 f"choose one of {', '.join(CLI_MIXERS)}")
        if self.theta_init_scale < 0:
            raise UserInputError(f"--harp_theta_init_scale must be >= 0, got {self.theta_init_scale}")
        if self.theta_clip is not None and self.theta_clip < 0:
            raise UserInputError(f"--harp_theta_clip must be >= 0, got {self.theta_clip}")
        for schedule in self.stage_bs or []:
            if not schedule or any(r < 2 for r in schedule):
                raise UserInputError(f"--harp_stage_bs radices must be >= 2, got {schedule}")

    def stage_size(self, size):
        """The size the stages act on: n2 of n = K n2 under the Kronecker fallback."""
        if self.kron_fallback and not _is_power_of_two(size):
            return hadamard_factor(size)[1]
        return size

    def rotation_kwargs(self, size):
        """StructuredRotation arguments for a rotation of `size`."""
        kwargs = {name: getattr(self, name) for name in self.__dataclass_fields__}
        inner = self.stage_size(size)
        kwargs["stage_bs"] = next((s for s in self.stage_bs or [] if math.prod(s) == inner), None)
        return kwargs


class StructuredRotation(OrthogonalTransform):
    """R = P^T where P applies, pass after pass, the stages 1..T: v <- K_{t,g} v,
    K_{t,g} = Q(S_{t,g}) M_{b_t}, S = (A - A^T)/2, A = theta (or clip * tanh(theta)).

    With `kron_fallback` and n = K n2 (n2 a power of two, n not): a row viewed as K x n2
    gets the inner rotation of size n2 on every slice, then the slices are mixed by
    H_K^T / sqrt(K) (at theta = 0: exactly QuIP#'s x U_n)."""

    def __init__(self, n, b=8, max_b=8, stage_bs=None, passes=1, ordering_mode="stride",
                 fixed_mixer="had_or_qr", use_givens_b2=False, theta_init_scale=0.0,
                 theta_clip=None, kron_fallback=False, quantized_theta=False, generator=None):
        super().__init__(n)
        opts = RotationOptions(b, max_b, [stage_bs] if stage_bs else None, passes, ordering_mode,
                               fixed_mixer, use_givens_b2, theta_init_scale, theta_clip, kron_fallback)
        opts.check()
        self.opts = opts
        self.kron_k = 1
        inner = n
        if kron_fallback and not _is_power_of_two(n):
            self.kron_k, inner = hadamard_factor(n)
            self.register_buffer("kron_mixer", hadamard_matrix(self.kron_k) / math.sqrt(self.kron_k),
                                 persistent=False)
        self.inner = inner
        if stage_bs is not None:
            if math.prod(stage_bs) != inner:
                raise UserInputError(f"--harp_stage_bs {stage_bs} multiplies to {math.prod(stage_bs)}, "
                                     f"not to the rotation size {inner}")
            self.schedule = list(stage_bs)
        else:
            self.schedule = radix_schedule(inner, b, max_b)
        self.strides = [math.prod(self.schedule[:t]) for t in range(len(self.schedule))]
        for radix in sorted(set(self.schedule)):
            self.register_buffer(f"mixer_{radix}", make_mixer(radix, opts.fixed_mixer), persistent=False)
        self.quantized_theta = quantized_theta
        self.theta = nn.ParameterList()
        if quantized_theta:
            self._make_int8_buffers()
        else:
            for _, radix, _ in self._stage_params():
                shape = (inner // radix,) if self._givens(radix) else (inner // radix, radix, radix)
                init = torch.zeros(shape)
                if theta_init_scale > 0:
                    g = generator if generator is not None else torch.Generator().manual_seed(0)
                    init = torch.randn(shape, generator=g) * theta_init_scale
                self.theta.append(nn.Parameter(init))
        self.cached = False

    def _givens(self, radix):
        return self.opts.use_givens_b2 and radix == 2

    def config(self):
        o = self.opts
        return {"b": o.b, "max_b": o.max_b, "stage_bs": list(self.schedule), "passes": o.passes,
                "ordering_mode": o.ordering_mode, "fixed_mixer": o.fixed_mixer,
                "use_givens_b2": o.use_givens_b2, "theta_init_scale": o.theta_init_scale,
                "theta_clip": o.theta_clip, "kron_fallback": o.kron_fallback,
                "quantized_theta": self.quantized_theta}

    def _stage_params(self):
        """(index, radix, stride) for every stage of every pass, in application order."""
        T = len(self.schedule)
        return [(p * T + t, self.schedule[t], self.strides[t])
                for p in range(self.opts.passes) for t in range(T)]

    def _skew_values(self, theta, radix):
        """Effective skew parameters of a stage from its raw theta (any leading dims):
        skew S (..., blocks, b, b), or the Givens angles (..., blocks)."""
        clip = self.opts.theta_clip
        A = clip * torch.tanh(theta) if clip else theta
        if self._givens(radix):
            return A
        return (A - A.transpose(-1, -2)) / 2

    def _block(self, values, radix):
        """K = Q(S) M_b in float32 (float64 when the parameters are float64)."""
        if values.dtype != torch.float64:
            values = values.float()
        Q = givens(values) if self._givens(radix) else cayley(values)
        return Q @ getattr(self, f"mixer_{radix}").to(Q.dtype)

    def stage_blocks(self, thetas=None):
        """K_{t,g} for every stage, in application order: (blocks, b, b) each, or with a
        leading batch dim when `thetas` (one raw tensor per stage) are stacked (L, ...)."""
        stages = self._stage_params()
        if thetas is None:
            if self.cached and not torch.is_grad_enabled():
                return [getattr(self, f"block_cache_{index}") for index, _, _ in stages]
            if self.quantized_theta:
                return [self._block(self._dequantized(index, radix), radix) for index, radix, _ in stages]
            thetas = list(self.theta)
        return [self._block(self._skew_values(theta, radix), radix)
                for theta, (_, radix, _) in zip(thetas, stages)]

    def cache_blocks(self):
        """Freeze the current blocks as (non-persistent) buffers for inference: no Cayley
        solve per forward. Fitting clears the cache."""
        self.cached = False
        with torch.no_grad():
            for (index, _, _), K in zip(self._stage_params(), self.stage_blocks()):
                self.register_buffer(f"block_cache_{index}", K, persistent=False)
        self.cached = True

    def clear_cache(self):
        self.cached = False

    def _run(self, x, blocks, transpose):
        """The rotation on rows x (L, R, n) with batched blocks (L, ...) per stage."""
        L, R, _ = x.shape
        if self.kron_k > 1 and transpose:
            x = (self.kron_mixer.to(x.dtype) @ x.reshape(L, R, self.kron_k, self.inner))
        x = x.reshape(L, R * self.kron_k, self.inner)
        stages = list(zip(blocks, self.strides * self.opts.passes))
        for K, stride in (stages[::-1] if transpose else stages):
            x = apply_stage(x, K.to(x.dtype), stride, transpose=transpose)
        x = x.reshape(L, R, self.kron_k, self.inner)
        if self.kron_k > 1 and not transpose:
            x = self.kron_mixer.to(x.dtype).T @ x
        return x.reshape(L, R, self.n)

    def _apply_rotation(self, x, blocks, transpose):
        if blocks is not None and blocks[0].dim() == 4:
            return self._run(x, blocks, transpose)
        blocks = [K[None] for K in (blocks or self.stage_blocks())]
        return self._run(x.reshape(1, -1, self.n), blocks, transpose).reshape(x.shape)

    def transform(self, x, blocks=None):
        """x R on the last dim. With batched `blocks` (from stacked thetas) x is (L, R, n)."""
        return self._apply_rotation(x, blocks, False)

    def inverse_transform(self, x, blocks=None):
        """x R^T on the last dim."""
        return self._apply_rotation(x, blocks, True)

    def num_skew_values(self):
        """Free parameters: sum_t inner (b_t - 1) / 2 per pass (one angle per Givens block)."""
        total = 0
        for _, radix, _ in self._stage_params():
            blocks = self.inner // radix
            total += blocks if self._givens(radix) else blocks * radix * (radix - 1) // 2
        return total

    def num_blocks(self):
        return sum(self.inner // radix for _, radix, _ in self._stage_params())

    def storage_bits(self):
        """HARP storage: 16 bits per skew value (float theta), or 8 per value + 16 per
        block (int8 theta with one fp16 scale per block)."""
        if self.quantized_theta:
            return 8 * self.num_skew_values() + 16 * self.num_blocks()
        return 16 * self.num_skew_values()

    def _upper(self, radix):
        return torch.triu_indices(radix, radix, offset=1)

    def _make_int8_buffers(self):
        for index, radix, _ in self._stage_params():
            blocks = self.inner // radix
            width = 1 if self._givens(radix) else radix * (radix - 1) // 2
            self.register_buffer(f"theta_q{index}", torch.zeros(blocks, width, dtype=torch.int8))
            self.register_buffer(f"theta_scale{index}", torch.ones(blocks, dtype=torch.float16))

    def _dequantized(self, index, radix):
        q = getattr(self, f"theta_q{index}").float()
        values = q * getattr(self, f"theta_scale{index}").float()[:, None]
        if self._givens(radix):
            return values[:, 0]
        rows, cols = self._upper(radix)
        S = torch.zeros(values.shape[0], radix, radix, dtype=values.dtype, device=values.device)
        S[:, rows, cols] = values
        return S - S.transpose(-1, -2)

    @torch.no_grad()
    def quantize_theta_(self):
        """Replace theta by int8 effective skew values (upper triangle of S after the
        clip, or the Givens angle) with one fp16 scale per block: max|v| / 127 (1 for an
        all-zero block). The Cayley transform of any skew matrix is orthogonal, so the
        rotation stays exactly orthogonal."""
        if self.quantized_theta:
            return
        quantized = []
        for index, radix, _ in self._stage_params():
            values = self._skew_values(self.theta[index], radix).float()
            if self._givens(radix):
                values = values[:, None]
            else:
                rows, cols = self._upper(radix)
                values = values[:, rows, cols]
            scale = values.abs().amax(dim=1) / 127
            scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half()
            q = torch.round(values / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            quantized.append((index, q, scale))
        self.theta = nn.ParameterList()
        self.quantized_theta = True
        for index, q, scale in quantized:
            self.register_buffer(f"theta_q{index}", q)
            self.register_buffer(f"theta_scale{index}", scale)
        self.cached = False


@dataclass
class FitOptions:
    """The `--harp_*` fitting flags (defaults of the QuIP# integration).

    Beyond the reference: `strategy="ldlq"` (target T from the backend's quantizer with
    LDLQ error feedback on H~, loss tr(E H~ E^T) / tr(W H W^T) with the full H~, E = W~/s - T:
    the real proxy of what is quantized); `h_shrink` a (the fit sees (1 - a) H + a diag H);
    `valid_every` k (with validation Hessians: every k steps the same objective on the
    held-out H; each linear keeps its validation-best theta)."""
    steps: int = 1200
    strategy: str = "proxy"
    lr_u: float = 0.03
    lr_v: float = 0.03
    reg_theta: float = 0.0
    grad_clip: float = None
    hbd_lambda: float = 0.1
    hbd_block: int = 8
    chunk_size: int = 131072
    q_recompute_every: int = 1
    early_stop_window: int = 0
    early_stop_min_rel_improve: float = 0.01
    h_shrink: float = 0.0
    valid_every: int = 0

    def check(self):
        if self.steps < 0:
            raise UserInputError(f"--harp_steps must be >= 0, got {self.steps}")
        if self.strategy not in STRATEGIES:
            raise UserInputError(f"unknown --harp_strategy {self.strategy!r}; "
                                 f"choose one of {', '.join(STRATEGIES)}")
        for name in ("lr_u", "lr_v", "reg_theta", "hbd_lambda"):
            if getattr(self, name) < 0:
                raise UserInputError(f"--harp_{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hbd_block", "chunk_size", "q_recompute_every"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--harp_{name} must be >= 1, got {getattr(self, name)}")
        if self.early_stop_window < 0:
            raise UserInputError(f"--harp_early_stop_window must be >= 0, got {self.early_stop_window}")
        if not 0 <= self.h_shrink <= 1:
            raise UserInputError(f"--harp_h_shrink must be in [0, 1], got {self.h_shrink}")
        if self.valid_every < 0:
            raise UserInputError(f"--harp_valid_every must be >= 0, got {self.valid_every}")


class VectorCodebookTarget:
    """The proxy target of a vector codebook: W~ / s cut along rows into vectors of
    `codesz` (rows zero-padded on the right), each rounded to its nearest codeword;
    s = (RMS(W~) + 1e-8) / c per matrix, c = scale_override if > 0 else the codebook's
    opt_scale. Works on one matrix (m, n) or a batch (L, m, n)."""

    def __init__(self, codebook, scale_override=-1.0, chunk_size=131072):
        self.codebook = codebook
        self.c = scale_override if scale_override > 0 else codebook.opt_scale
        self.chunk_size = chunk_size

    def scale(self, Wt):
        return (Wt.square().mean(dim=(-2, -1), keepdim=True).sqrt() + 1e-8) / self.c

    def __call__(self, X):
        n = X.shape[-1]
        pad = -n % self.codebook.codesz
        T, _ = self.codebook.quantize(torch.nn.functional.pad(X, (0, pad)), chunk_rows=self.chunk_size)
        return T[..., :n]

    def with_feedback(self, X, Ht):
        """The target with error feedback on H~ (strategy "ldlq"): backend-specific."""
        raise UserInputError("--harp_strategy ldlq needs a target with error feedback; "
                             "this backend's target has none")


def offblock_sq_sum(Ht, block):
    """Sum of squared entries of each Ht (..., n, n) outside its diagonal blocks
    (off-diagonal entries when `block` does not divide n)."""
    n = Ht.shape[-1]
    total = Ht.square().sum(dim=(-2, -1))
    if n % block:
        return total - Ht.diagonal(dim1=-2, dim2=-1).square().sum(-1)
    blocks = Ht.reshape(*Ht.shape[:-2], n // block, block, n // block, block)
    inside = blocks.diagonal(dim1=-4, dim2=-2)
    return total - inside.square().sum(dim=(-3, -2, -1))


def early_stop(losses, window, min_rel_improve):
    """Stop when the best of the last `window` losses improves on the best before them
    by less than `min_rel_improve` (relative)."""
    if window <= 0 or len(losses) <= window:
        return False
    before, recent = min(losses[:-window]), min(losses[-window:])
    return (before - recent) / max(abs(before), 1e-12) < min_rel_improve


@dataclass
class FitResult:
    loss_start: float = None
    proxy_start: float = None
    proxy_end: float = None
    steps_run: int = 0
    seconds: float = 0.0
    batch: int = 1
    hbd_skipped: bool = False
    valid_start: float = None
    valid_best: float = None
    valid_best_step: int = None
    losses: list = field(default_factory=list)


class HARPProcessor(IncoherenceProcessor):
    """Random signs + fitted HARP rotations: R_v (input side, n) and R_u (output side, m)."""

    def __init__(self, n, m, SU=None, SV=None, rotation=None, generator=None):
        rotation = rotation or RotationOptions()
        right = StructuredRotation(n, generator=generator, **rotation.rotation_kwargs(n))
        left = StructuredRotation(m, generator=generator, **rotation.rotation_kwargs(m))
        super().__init__("harp", torch.ones(n) if SU is None else SU,
                         torch.ones(m) if SV is None else SV, right, left)

    def fit(self, H, W, target, opts=None, log=None):
        """Fit theta of both sides on (H, W): H the regularized input second moment, W the
        (normalized) weight, target a proxy target (e.g. VectorCodebookTarget)."""
        return fit_processors([self], [H], [W], target, opts, log)[0]


class _StackedFit:
    """L processors of one shape and structure, fitted as one batch: their raw thetas
    stacked along a new leading dim, every op batched. The loss is the sum of the
    per-processor losses and Adam, clipping and early stopping act per processor, so
    each one follows exactly the trajectory of its own fit."""

    def __init__(self, processors, Hs, Ws, h_shrink=0.0, Hs_valid=None):
        ref = processors[0]
        self.processors, self.rv, self.ru = processors, ref.right, ref.left
        self.theta_v = [nn.Parameter(torch.stack([p.right.theta[i].detach() for p in processors]))
                        for i in range(len(ref.right.theta))]
        self.theta_u = [nn.Parameter(torch.stack([p.left.theta[i].detach() for p in processors]))
                        for i in range(len(ref.left.theta))]
        self.Hs = shrink_to_diagonal(self._signed_hessians(Hs), h_shrink)
        self.Hv = None if Hs_valid is None else self._signed_hessians(Hs_valid)
        self.Ws = torch.stack([p.signed_weight(W.float()) for p, W in zip(processors, Ws)])

    def _signed_hessians(self, Hs):
        return torch.stack([p.signed_hessian(H.float()) for p, H in zip(self.processors, Hs)])

    def params(self):
        return self.theta_v + self.theta_u

    def rotate_hessian(self, H, blocks_v):
        rv = self.rv
        return rv.transform(rv.transform(H, blocks_v).transpose(-1, -2), blocks_v).transpose(-1, -2)

    def rotated(self):
        """(W~ = R_u^T Ws R_v, H~ = R_v^T Hs R_v, R_v's blocks), (L, m, n), (L, n, n)."""
        bv, bu = self.rv.stage_blocks(self.theta_v), self.ru.stage_blocks(self.theta_u)
        Wt = self.ru.transform(self.rv.transform(self.Ws, bv).transpose(-1, -2), bu).transpose(-1, -2)
        return Wt, self.rotate_hessian(self.Hs, bv), bv

    @torch.no_grad()
    def target(self, Wt, Ht, target, strategy):
        """(s, T): scale and the backend's quantization of W~ / s (with LDLQ feedback on H~
        for strategy "ldlq")."""
        s = target.scale(Wt)
        T = target.with_feedback(Wt / s, Ht) if strategy == "ldlq" else target(Wt / s)
        return s, T

    def objective(self, Wt, Ht, T, s, strategy):
        """Per-processor proxy (L,): diagonal-weighted rounding error ("proxy") or the
        relative full-Hessian error tr(E H~ E^T) / tr(W~ H~ W~^T) ("ldlq")."""
        E = Wt / s - T
        if strategy == "ldlq":
            signal = ((Wt / s) @ Ht * (Wt / s)).sum(dim=(-2, -1)).detach()
            return (E @ Ht * E).sum(dim=(-2, -1)) / signal
        h = Ht.diagonal(dim1=-2, dim2=-1).detach().abs()
        h = h / (h.mean(dim=-1, keepdim=True) + 1e-8)
        return (h[:, None, :] * E.square()).mean(dim=(-2, -1))

    def losses(self, Wt, Ht, T, s, opts, use_hbd):
        """Per-processor (total, proxy), each (L,)."""
        proxy = self.objective(Wt, Ht, T, s, opts.strategy)
        total = proxy
        if use_hbd:
            total = total + opts.hbd_lambda * offblock_sq_sum(Ht, opts.hbd_block) / Ht.shape[-1] ** 2
        if opts.reg_theta > 0:
            total = total + opts.reg_theta * sum(t.square().flatten(1).mean(1) for t in self.params())
        return total, proxy

    @torch.no_grad()
    def validation(self, Wt, T, s, blocks_v, strategy):
        """The objective on the held-out Hessians, same W~ and target (L,)."""
        return self.objective(Wt, self.rotate_hessian(self.Hv, blocks_v), T, s, strategy)

    def clip_gradients(self, max_norm):
        """Per-processor global gradient-norm clipping (torch's clip_grad_norm_ rule)."""
        sq = sum(p.grad.square().flatten(1).sum(1) for p in self.params())
        factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.params():
            p.grad.mul_(factor.view(-1, *[1] * (p.dim() - 1)))

    def snapshot(self, index):
        return [p[index].detach().clone() for p in self.params()]

    @torch.no_grad()
    def write_back(self, snapshots):
        """Copy each processor's slice (or its chosen snapshot) into its rotations."""
        for index, proc in enumerate(self.processors):
            values = snapshots.get(index) or [p[index] for p in self.params()]
            thetas = list(proc.right.theta) + list(proc.left.theta)
            for theta, value in zip(thetas, values):
                theta.copy_(value)


def shrink_to_diagonal(H, amount):
    """(1 - amount) H + amount diag(H), for a batch (..., n, n)."""
    if amount == 0:
        return H
    diagonal = torch.diag_embed(H.diagonal(dim1=-2, dim2=-1))
    return (1 - amount) * H + amount * diagonal


class _ValidationBest:
    """Per processor: the validation-best theta seen so far (checked every k steps)."""

    def __init__(self, batch, results):
        self.batch, self.results, self.snapshots = batch, results, {}

    def update(self, step, values, active):
        for index, value in enumerate(values.tolist()):
            r = self.results[index]
            if step == 0:
                r.valid_start = value
            if index in active and (r.valid_best is None or value < r.valid_best):
                r.valid_best, r.valid_best_step = value, step
                self.snapshots[index] = self.batch.snapshot(index)


def fit_processors(processors, Hs, Ws, target, opts=None, log=None, Hs_valid=None):
    """Fit HARP processors of identical shapes and structure together (e.g. the same
    site of several layers) on their (H, W): the loss of the module docstring per
    processor, Adam (V group, then U; torch defaults). Each processor keeps theta after
    its last executed step, or, with `Hs_valid` and `opts.valid_every`, its
    validation-best theta. Returns one FitResult per processor (losses recorded before
    each update)."""
    opts = opts or FitOptions()
    opts.check()
    validating = Hs_valid is not None and opts.valid_every > 0
    start = time.time()
    for proc in processors:
        proc.right.clear_cache()
        proc.left.clear_cache()
    batch = _StackedFit(processors, Hs, Ws, opts.h_shrink, Hs_valid if validating else None)
    L, n = len(processors), batch.Hs.shape[-1]
    use_hbd = opts.hbd_lambda > 0 and n < HBD_MAX_N
    if opts.hbd_lambda > 0 and not use_hbd and log is not None:
        log(f"HARP: Hessian block regularizer skipped for n = {n} >= {HBD_MAX_N} (memory)")
    optimizer = torch.optim.Adam([{"params": batch.theta_v, "lr": opts.lr_v},
                                  {"params": batch.theta_u, "lr": opts.lr_u}])
    results = [FitResult(batch=L, hbd_skipped=opts.hbd_lambda > 0 and not use_hbd) for _ in range(L)]
    best = _ValidationBest(batch, results)
    losses, histories, stopped = [], [[] for _ in range(L)], {}
    for step in range(opts.steps + 1):
        if step == opts.steps and not validating:
            break
        Wt, Ht, bv = batch.rotated()
        if step % opts.q_recompute_every == 0 or step == opts.steps:
            s, T = batch.target(Wt.detach(), Ht.detach(), target, opts.strategy)
        if validating and (step % opts.valid_every == 0 or step == opts.steps):
            active = set(range(L)) - set(stopped)
            best.update(step, batch.validation(Wt.detach(), T, s, bv, opts.strategy), active)
        if step == opts.steps:
            break
        total, proxy = batch.losses(Wt, Ht, T, s, opts, use_hbd)
        if step == 0:
            for r, t0, p0 in zip(results, total.tolist(), proxy.tolist()):
                r.loss_start, r.proxy_start = t0, p0
        losses.append(total.detach())
        optimizer.zero_grad(set_to_none=True)
        total.sum().backward()
        if opts.grad_clip is not None and opts.grad_clip > 0:
            batch.clip_gradients(opts.grad_clip)
        optimizer.step()
        for index, r in enumerate(results):
            if index not in stopped:
                r.steps_run = step + 1
        if opts.early_stop_window > 0:
            for index, value in enumerate(total.tolist()):
                if index in stopped:
                    continue
                histories[index].append(value)
                if early_stop(histories[index], opts.early_stop_window, opts.early_stop_min_rel_improve):
                    stopped[index] = batch.snapshot(index)
            if len(stopped) == L:
                break
    batch.write_back(best.snapshots if validating else stopped)
    with torch.no_grad():
        final = _StackedFit(processors, Hs, Ws, opts.h_shrink)
        Wt, Ht, _ = final.rotated()
        s, T = final.target(Wt, Ht, target, opts.strategy)
        proxy = final.objective(Wt, Ht, T, s, opts.strategy)
    curves = torch.stack(losses).T.tolist() if losses else [[] for _ in range(L)]
    seconds = (time.time() - start) / L
    for r, p_end, curve in zip(results, proxy.tolist(), curves):
        r.proxy_end, r.losses, r.seconds = p_end, curve[:r.steps_run], seconds
        if r.proxy_start is None:
            r.proxy_start = r.proxy_end
    return results
