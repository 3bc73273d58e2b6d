r"""Proximal operators of ProxSparse (Liu et al.): the 2:4 regularizer and the frozen-weight regularizer.

ProxSparse learns a 2:4 mask by proximal gradient descent on

.. math::  \min_W \; \mathcal L(W) + \lambda_1 \mathrm{Reg}_{2:4}(W) + \lambda_2 \mathrm{Reg}_{W_0}(W),

taking a gradient step on :math:`\mathcal L + \lambda_2 \mathrm{Reg}_{W_0}` and then the proximal
operator of :math:`\lambda_1 \mathrm{Reg}_{2:4}` (Algorithm 1 of the paper).  This module provides

- :func:`soft_threshold` -- the prox of :math:`t\|x\|_1` (the 1-D building block);
- :func:`reg_24`, :func:`reg_24_total` -- the 2:4 regularizer of Kübler et al. (2025): for each group
  of four consecutive weights along the last (input) dimension, the sum of the four triple products
  :math:`|w_iw_jw_k|`.  It is zero iff the group has at most two non-zeros;
- :func:`prox_24` -- its exact proximal operator, per group

  .. math::  \operatorname{prox}_{\lambda \mathrm{Reg}}(y) = \arg\min_x \tfrac12\|x-y\|^2 + \lambda\, \mathrm{Reg}_{2:4}(x),

  on CPU by a compiled C++ kernel (built at first use, cached), elsewhere by :func:`prox_24_torch`;
- :func:`prox_24_alm` -- the paper's EnumALM (alternating minimisation) for comparison; it is *not*
  exact (see below);
- :func:`reg_frozen`, :func:`reg_frozen_grad` (:func:`add_reg_frozen_grad_`), :func:`prox_frozen` -- the frozen-weight regularizer,
  its gradient and its exact (closed-form) proximal operator.

The exact 2:4 prox
------------------
Write :math:`z` for the magnitudes of a group sorted in decreasing order.  By symmetry the prox is
:math:`\operatorname{sign}(y)` times the minimiser over :math:`w \ge 0` of
:math:`g(w) = \tfrac12\|w - z\|^2 + \lambda e_3(w)` (:math:`e_3` = sum of the triple products), put back
in the original order, and (Kübler et al., Theorem 4 in ProxSparse) that minimiser is one of three
candidates: the 2-sparse point :math:`(z_1, z_2, 0, 0)`; the 3-sparse point, the minimiser of
:math:`g_3(w) = \tfrac12\|w-z_{1:3}\|^2 + \lambda w_1w_2w_3` over the convex set where its Hessian is
positive semidefinite; the dense point, the same for :math:`g`.  An interior critical point with a PSD
Hessian minimises the convex restriction, so each candidate is *the* PSD critical point (there is at
most one).  (On three non-zero coordinates the regularizer is the single triple product
:math:`w_1w_2w_3`; the paper's display of :math:`g_3` with pairwise products is a typo, and the partial
derivative used by a coordinate update is the product of the other two coordinates -- for the dense
point, the sum over pairs of the other three.)

The paper computes the two candidates by alternating minimisation (ALM): cyclic non-negative
soft-thresholding :math:`w_i \leftarrow \max(0, z_i - \lambda\, \partial_i e_3(w))`.  That converges to
*a* critical point, which can be a boundary point instead of the PSD one: for :math:`y = (1, 1, 1, 0)`
and :math:`\lambda = 1.01` the first sweep sets the largest coordinate to zero and ALM (and the
reference implementation, which starts at zero) returns :math:`(1, 1, 0, 0)` with objective 0.5,
while :math:`w_1=w_2=w_3=(\sqrt{1+4\lambda}-1)/(2\lambda)` has objective 0.457.  :func:`prox_24`
therefore computes the candidates exactly:

*3-sparse point.*  With :math:`s = \lambda w_3` the stationarity conditions of :math:`w_1, w_2` are
linear: :math:`w_{1,2} = m/(1+s) \pm d/(1-s)` with :math:`m, d` the half sum and half difference of
:math:`z_1, z_2`.  What remains is one equation,
:math:`G(s) = s - \lambda z_3 + \lambda^2 (m^2/(1+s)^2 - d^2/(1-s)^2) = 0` on
:math:`0 \le s \le \min(\lambda z_3, z_2/z_1)`; :math:`G` is :math:`\lambda` times the derivative of the
partial minimum of :math:`g_3` over :math:`w_1, w_2`, so the PSD point is the unique *upward* crossing
of :math:`G`.  :math:`G'' \propto m^2(1-s)^4 - d^2(1+s)^4` changes sign once, at
:math:`s^* = (1-\kappa)/(1+\kappa)`, :math:`\kappa = \sqrt{d/m}`: :math:`G` is convex, then concave.
Newton's method started at :math:`s^*` (clipped to the interval) therefore moves monotonically to the
crossing -- leftwards on the convex part if :math:`G(s^*) > 0`, rightwards on the concave part if
:math:`G(s^*) < 0` -- or proves there is none (it leaves the interval or passes the extremum of
:math:`G`).  Any root of :math:`G` in the interval with :math:`G' > 0` is the crossing, which also
certifies warm-started iterations.

*Dense point.*  Fix :math:`t = w_4`.  With :math:`u = w_{1:3} + t` the remaining problem is a 3-sparse
problem with data :math:`z_{1:3} + t + \lambda t^2` (because
:math:`w_1w_2w_3 + t\, e_2(w) = \prod(w_i + t) - t^2 e_1(w) - t^3`), solved as above; the derivative of
the partial minimum :math:`D(t)` is :math:`R(t) = t - z_4 + \lambda e_2(w_{1:3}(t))`, the dense PSD
point is the unique upward crossing of :math:`R`, and :math:`R'(t)` is the Schur complement of the
(positive definite) inner Hessian in the full one.  Consequences used by the solver:

- :math:`R(0) < 0` (the 3-sparse point is not a local minimum): a dense point exists below it;
  Newton's method on the two remaining equations in :math:`(s, t)` from the tangent prediction finds
  it, and the result is verified (positive, sorted, inner Hessian positive definite,
  :math:`R' \ge 0`);
- :math:`R(0) \ge 0` and :math:`R'(0) \ge 0`: the full Hessian at the 3-sparse point :math:`p_3` is PSD,
  so :math:`p_3` lies in the convex set :math:`C_4` where :math:`g` is convex, and for the dense point
  :math:`w^*` (also in :math:`C_4`) :math:`g(w^*) \ge g(p_3) + \nabla g(p_3)\cdot(w^*-p_3) = g(p_3) +
  R(0) w^*_4 \ge g(p_3)`: the dense point cannot win;
- otherwise (rare): interval bounds from the fixed-point map of the stationarity conditions often
  prove there is no dense point.  They use sortedness, a 2x2 principal minor of the Hessian
  (:math:`\lambda(w_1 + w_2) \le 1`), and that :math:`z_i - w_i = \lambda e_2(w_{\setminus i})` does not
  decrease with :math:`i` at a sorted critical point (dropping a smaller coordinate leaves a larger
  :math:`e_2`), so :math:`w_j - w_i \le z_j - z_i` for :math:`i < j`.  If they do not, a certified walk
  along :math:`t`, using :math:`e_2(w(t))` non-increasing (so
  :math:`R \ge t_a - z_4 + \lambda e_2(w(t_b))` on :math:`[t_a, t_b]`) and :math:`R' \le 1`, either
  brackets the crossing or proves that no point of the path beats the best candidate (with both ends
  of a step evaluated, these two bounds on :math:`R` integrate to two convex quadratic lower bounds on
  :math:`D` whose maximum is minimised in closed form); where the inner solution ends (a fold) the
  same interval bounds, with :math:`w \ge t_a`, can end the walk.
- no interior 3-sparse point: then there is no dense one either.

Cheap certificates skip most of this: a quadratic lower bound proves that the 2-sparse point is
optimal for most groups that end up 2-sparse, and many others have no 3-sparse point at all, which
needs no iteration: :math:`G'` is largest at :math:`s^*`, where it equals
:math:`1 - \lambda^2 m^2 (1+\kappa)^4 / 4`, and :math:`m(1+\kappa)^2 = 1 + \sqrt{1 - z_2^2}` (with
:math:`z_1 = 1`), so :math:`\lambda (1 + \sqrt{1 - z_2^2}) \ge 2` rules out an upward crossing.  At the other end, when
:math:`3\lambda \le 2^{-54} z_{\min}` and :math:`z_{\min}^2 > 8\lambda` (:math:`z_{\min}` the smallest
non-zero), every point that drops a non-zero costs more than :math:`\tfrac12 z_{\min}^2 > 4\lambda \ge`
the objective of :math:`z`, so the optimum keeps all non-zeros and lies within :math:`3\lambda` of
:math:`z`, below half an ulp: the input is returned (this also covers a :math:`\lambda` so small that
:math:`\lambda^2` underflows).  The Newton iterations stop per group when the relative
step is below ``tol``; since they converge quadratically the result is then accurate to rounding.
The kernel works in float64 on groups normalised by their largest magnitude (the problem is scale
invariant: :math:`(z, \lambda) \sim (cz, \lambda/c)`).  Two facts used above are checked empirically
rather than proved: no dense point exists when no 3-sparse point does, and :math:`w_3(t)` does not
increase along the inner solution (both held on millions of random, tied and realistic groups against
a brute-force multi-start solver).

Fast path
---------
:func:`prox_24` on a contiguous CPU float32/float64 tensor calls ``_prox_kernel.cpp`` through ctypes.
The source is compiled once per machine with the system C++ compiler (``$CXX``, else ``c++``/``g++``;
``-O3 -march=native -fopenmp``, falling back to fewer flags) into ``<cache>/kernels``
(``$MINISPARSE_CACHE`` or the platform user cache directory; the temporary directory if that is not
writable); the file name hashes the source, the compiler and its version, and the CPU, and the file is
written atomically.  No network and no torch headers are
needed, so it builds in a second or two.  If no compiler works, :func:`prox_24` warns once and uses
:func:`prox_24_torch`.  ``MINISPARSE_NO_KERNEL=1`` disables the kernel.

The kernel processes chunks of 256 groups per thread (its work arrays stay in cache) in stages that
operate on full SIMD blocks (two vectors of four groups with AVX2, of eight with AVX-512): sort and
certificates for every group, writing the output of the groups they settle; the 3-sparse Newton
iteration for the groups that need it; the dense Newton iteration for those with :math:`R(0)<0`; the
scalar certified path for the few left; then order, signs and scale are restored for the groups past
the first stage.  The vector 3-sparse stage runs Newton's method on the polynomials
:math:`N = G\,A^2B^2` and :math:`P = G'A^3B^3` (:math:`A = 1+s`, :math:`B = 1-s`, both positive on the
domain), which have the signs of :math:`G` and :math:`G'`, so a step :math:`G/G' = NAB/P` costs one
division; it starts at the inflection point :math:`z_2/(1+\sqrt{1-z_2^2})`, or closer to the root at
an upper bound of :math:`s` from two rounds of the antitone fixed-point map
:math:`u_i \mapsto z_i - \lambda u_j u_k` when :math:`G > 0 < G'` there (then it lies in the convex part,
right of the root, and the iteration keeps its monotone convergence).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Union

import torch

__all__ = [
    "soft_threshold",
    "reg_24",
    "reg_24_total",
    "prox_24",
    "prox_24_",
    "prox_24_torch",
    "prox_24_alm",
    "objective_24",
    "reg_frozen",
    "reg_frozen_grad",
    "add_reg_frozen_grad_",
    "prox_frozen",
    "kernel_available",
    "kernel_info",
]

Lam = Union[float, int, torch.Tensor]

DEFAULT_TOL = 1e-10
DEFAULT_MAX_ITER = 100


# ---------------------------------------------------------------------------------------------------
# Small building blocks


def soft_threshold(y: torch.Tensor, t: Union[float, torch.Tensor]) -> torch.Tensor:
    r"""Elementwise soft-thresholding :math:`\operatorname{sign}(y)\max(|y| - t, 0)`.

    It is the proximal operator of :math:`t\|x\|_1`:
    :math:`\arg\min_x \tfrac12\|x-y\|^2 + t\|x\|_1`.  ``t`` is a non-negative scalar or a tensor
    that broadcasts against ``y``.
    """
    t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
    if bool((t < 0).any()):
        raise ValueError("soft_threshold: the threshold t must be non-negative")
    return torch.sign(y) * torch.clamp(y.abs() - t, min=0)


def _groups(w: torch.Tensor, name: str = "W") -> torch.Tensor:
    if w.dim() < 1 or w.shape[-1] % 4 != 0:
        raise ValueError(
            f"{name} must have a last (input) dimension divisible by 4 for 2:4 groups; got shape {tuple(w.shape)}"
        )
    return w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4)


def reg_24(w: torch.Tensor) -> torch.Tensor:
    r"""The 2:4 regularizer per group of four consecutive weights along the last dimension.

    For a group :math:`(w_1, w_2, w_3, w_4)` it is
    :math:`|w_1w_2w_3| + |w_1w_2w_4| + |w_1w_3w_4| + |w_2w_3w_4|`; it is zero iff at most two of the
    four are non-zero, and invariant under permutations within the group.  Returns a tensor of shape
    ``w.shape[:-1] + (w.shape[-1] // 4,)`` and the dtype of ``w`` (computed in float64);
    :func:`reg_24_total` sums it.
    """
    a = _groups(w, "w").abs()
    if a.dtype != torch.float64:  # products of three weights overflow easily in low precision
        a = a.double()
    a0, a1, a2, a3 = a.unbind(-1)
    return (a0 * a1 * (a2 + a3) + a2 * a3 * (a0 + a1)).to(w.dtype)


def reg_24_total(w: torch.Tensor) -> torch.Tensor:
    """The total 2:4 regularizer of a weight tensor (sum of :func:`reg_24` over all groups)."""
    return reg_24(w).sum()


def objective_24(x: torch.Tensor, y: torch.Tensor, lam: Lam) -> torch.Tensor:
    r"""Per-group prox objective :math:`\tfrac12\|x-y\|^2 + \lambda\,\mathrm{Reg}_{2:4}(x)` (float64)."""
    xd, yd = x.double(), y.double()
    lam_g = _lam_per_group(lam, y, torch.float64, y.device)
    return 0.5 * ((_groups(xd) - _groups(yd)) ** 2).sum(-1) + lam_g * reg_24(xd)


def _lam_per_group(lam: Lam, W: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """lam as a tensor of shape W.shape[:-1] + (d_in/4,), validated (finite, >= 0)."""
    gshape = (*W.shape[:-1], W.shape[-1] // 4)
    lt = torch.as_tensor(lam, dtype=dtype, device=device)
    if not bool(torch.isfinite(lt).all()) or bool((lt < 0).any()):
        raise ValueError("lam must be finite and non-negative")
    try:
        return torch.broadcast_to(lt, gshape)
    except RuntimeError:
        raise ValueError(
            f"lam of shape {tuple(lt.shape)} does not broadcast to the group shape {gshape} "
            f"(W.shape[:-1] + (d_in/4,))"
        ) from None


# ---------------------------------------------------------------------------------------------------
# The compiled kernel

_KERNEL_SOURCE = Path(__file__).with_name("_prox_kernel.cpp")
_kernel_lock = threading.Lock()
_kernel: object = None  # None: not tried yet; False: unavailable; else the loaded library
_kernel_meta: dict = {}


def _cache_root() -> Path:
    env = os.environ.get("MINISPARSE_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("minisparse"))
    except Exception:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".cache" / "minisparse"


def _cpu_fingerprint() -> str:
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    parts.append(line.strip())
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    return None


def _compile(cxx: str, src: Path, out: Path) -> list[str]:
    """Compile src into the shared library out; returns the flags that worked (raises if none)."""
    base = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]
    attempts = [["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native", "-fopenmp-simd"],
                ["-fopenmp-simd"], ["-march=native"], []]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; the Python side threads instead
        attempts = [["-mcpu=native", "-fopenmp-simd"], ["-mcpu=native"], []]
    errors = []
    for extra in attempts:
        flags = base + extra
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem + ".", suffix=".tmp.so")
        os.close(fd)
        cmd = cxx.split() + flags + [str(src), "-o", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(cmd)}: {exc}")
            os.unlink(tmp)
            continue
        if res.returncode == 0:
            os.replace(tmp, out)  # atomic: concurrent builders agree on the result
            return flags
        errors.append(f"{' '.join(cmd)}:\n{res.stderr[-2000:]}")
        os.unlink(tmp)
    raise RuntimeError("could not compile the prox kernel:\n" + "\n".join(errors))


def _load_kernel():
    global _kernel
    if _kernel is not None:
        return _kernel or None
    with _kernel_lock:
        if _kernel is not None:
            return _kernel or None
        if os.environ.get("MINISPARSE_NO_KERNEL", "") not in ("", "0"):
            _kernel = False
            _kernel_meta["error"] = "disabled by MINISPARSE_NO_KERNEL"
            return None
        try:
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set $CXX)")
            src = _KERNEL_SOURCE.read_bytes()
            try:
                version = subprocess.run(cxx.split() + ["--version"], capture_output=True, text=True,
                                         timeout=60).stdout
            except (OSError, subprocess.SubprocessError):
                version = ""
            key = hashlib.sha256(b"\0".join([src, cxx.encode(), version.encode(),
                                             _cpu_fingerprint().encode(), b"v1"])).hexdigest()[:20]
            kdir = _cache_root() / "kernels"
            try:
                kdir.mkdir(parents=True, exist_ok=True)
                if not os.access(kdir, os.W_OK):
                    raise PermissionError(str(kdir))
            except OSError:  # read-only cache: build in the temporary directory instead
                kdir = Path(tempfile.gettempdir()) / f"minisparse-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
                kdir.mkdir(parents=True, exist_ok=True)
            lib_path = kdir / f"prox24_{key}.so"
            flags_path = kdir / f"prox24_{key}.flags"
            if not lib_path.exists():
                flags = _compile(cxx, _KERNEL_SOURCE, lib_path)
                flags_path.write_text(" ".join(flags), encoding="utf-8")
            lib = ctypes.CDLL(str(lib_path))
            if lib.minisparse_prox24_abi_version() != 1:
                raise RuntimeError(f"{lib_path}: unexpected ABI version")
            argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                        ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            for fn in (lib.minisparse_prox24_f32, lib.minisparse_prox24_f64):
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int64
            _kernel_meta.update(path=str(lib_path), compiler=cxx,
                                flags=flags_path.read_text(encoding="utf-8") if flags_path.exists() else "",
                                openmp=bool(lib.minisparse_prox24_has_openmp()))
            _kernel = lib
        except Exception as exc:  # any failure: fall back to the torch path
            _kernel = False
            _kernel_meta["error"] = str(exc)
            warnings.warn(
                f"minisparse.prox: the compiled 2:4 prox kernel is unavailable ({str(exc).splitlines()[0]}); "
                "using the pure-torch implementation (slower)",
                RuntimeWarning,
                stacklevel=3,
            )
        return _kernel or None


def kernel_available() -> bool:
    """Whether the compiled CPU kernel of :func:`prox_24` could be built and loaded."""
    return _load_kernel() is not None


def kernel_info() -> dict:
    """Where the kernel lives, the compiler and flags used, whether it has OpenMP (or why it failed)."""
    _load_kernel()
    return dict(_kernel_meta)


def _run_kernel(y: torch.Tensor, x: torch.Tensor, lam_g: torch.Tensor | float, tol: float, max_iter: int,
                num_threads: int | None) -> list[int]:
    """y, x: contiguous CPU float32/float64 with numel % 4 == 0; lam_g: float or contiguous float64
    tensor with one value per group."""
    lib = _load_kernel()
    assert lib is not None
    ngroups = y.numel() // 4
    fn = lib.minisparse_prox24_f32 if y.dtype == torch.float32 else lib.minisparse_prox24_f64
    if isinstance(lam_g, torch.Tensor):
        lam_buf, stride = lam_g, 1
    else:
        lam_buf, stride = torch.tensor([float(lam_g)], dtype=torch.float64), 0
    nthreads = num_threads if num_threads is not None else torch.get_num_threads()
    nthreads = max(1, int(nthreads))
    stats = torch.zeros(5, dtype=torch.int64)
    if ngroups == 0:
        return stats.tolist()
    if _kernel_meta.get("openmp", False) or nthreads == 1 or ngroups < 32768:
        fn(y.data_ptr(), x.data_ptr(), ngroups, lam_buf.data_ptr(), stride, float(tol), int(max_iter),
           nthreads, stats.data_ptr())
        return stats.tolist()
    # no OpenMP in the kernel: split the groups over Python threads (ctypes releases the GIL)
    from concurrent.futures import ThreadPoolExecutor

    bounds = [ngroups * i // nthreads for i in range(nthreads + 1)]
    parts = torch.zeros(nthreads, 5, dtype=torch.int64)
    es = y.element_size()

    def work(i: int) -> None:
        g0, g1 = bounds[i], bounds[i + 1]
        fn(y.data_ptr() + 4 * g0 * es, x.data_ptr() + 4 * g0 * es, g1 - g0,
           lam_buf.data_ptr() + 8 * g0 * stride, stride, float(tol), int(max_iter), 1, parts[i].data_ptr())

    with ThreadPoolExecutor(nthreads) as ex:
        list(ex.map(work, range(nthreads)))
    return parts.sum(0).tolist()


# ---------------------------------------------------------------------------------------------------
# Public prox


def _check_args(W: torch.Tensor, tol: float, max_iter: int) -> None:
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError("W must be a floating-point torch.Tensor")
    _groups(W)
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError("tol must be a positive number")
    if int(max_iter) < 1:
        raise ValueError("max_iter must be at least 1")


def _lam_arg(lam: Lam, W: torch.Tensor):
    """A float (one lam for all groups) or a contiguous float64 CPU tensor with one value per group."""
    if isinstance(lam, torch.Tensor) and lam.numel() != 1:
        return _lam_per_group(lam.detach().to("cpu"), W, torch.float64, "cpu").contiguous().reshape(-1)
    val = float(lam.item() if isinstance(lam, torch.Tensor) else lam)
    if not (math.isfinite(val) and val >= 0):
        raise ValueError("lam must be finite and non-negative")
    return val


def prox_24(
    W: torch.Tensor,
    lam: Lam,
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    num_threads: int | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    r"""Exact proximal operator of :math:`\lambda\,\mathrm{Reg}_{2:4}`, applied to every group of four
    consecutive weights along the last dimension of ``W``.

    Per group it returns :math:`\arg\min_x \tfrac12\|x - y\|^2 + \lambda \mathrm{Reg}_{2:4}(x)` (see the
    module docstring for the algorithm).  The result has at most the signs of ``W`` (a coordinate is
    zero or keeps its sign) and no larger magnitudes; ``lam = 0`` returns ``W``; a large ``lam``
    returns the top-2 (magnitude) projection of every group.

    Args:
        W: floating-point tensor whose last dimension is divisible by 4 (any leading shape, any device).
        lam: non-negative scalar, or a tensor that broadcasts to the group shape
            ``W.shape[:-1] + (W.shape[-1] // 4,)`` (one value per group).
        tol: a Newton iteration of a group stops when its relative step falls below ``tol``.
        max_iter: cap on the iterations of each Newton iteration.
        out: optional output tensor (same shape and dtype as ``W``; may be ``W`` itself).
        backend: ``"auto"`` (the kernel for CPU tensors, else torch), ``"kernel"`` or ``"torch"``.
        num_threads: threads of the kernel (default ``torch.get_num_threads()``).
        stats: optional dict, filled by the kernel path with the number of groups whose result has
            2 (or fewer), 3 and 4 non-zeros (``n2``, ``n3``, ``n4``), that took the scalar certified
            walk (``walks``) and of Newton iterations that hit ``max_iter`` (``capped``).

    Non-finite groups are returned unchanged.  float16/bfloat16 inputs are computed in float32.
    """
    _check_args(W, tol, max_iter)
    if out is not None and (out.shape != W.shape or out.dtype != W.dtype or out.device != W.device):
        raise ValueError("out must have the shape, dtype and device of W")
    if backend not in ("auto", "kernel", "torch"):
        raise ValueError("backend must be 'auto', 'kernel' or 'torch'")
    use_kernel = backend == "kernel" or (backend == "auto" and W.device.type == "cpu")
    if use_kernel and W.device.type != "cpu":
        raise ValueError("backend='kernel' needs a CPU tensor")
    if use_kernel and _load_kernel() is None:
        if backend == "kernel":
            raise RuntimeError(f"the prox kernel is unavailable: {_kernel_meta.get('error')}")
        use_kernel = False
    if not use_kernel:
        res = prox_24_torch(W, lam, tol=tol, max_iter=max_iter)
        if out is None:
            return res
        out.copy_(res)
        return out
    lam_arg = _lam_arg(lam, W)
    work_dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    y = W.detach()
    if y.dtype != work_dtype or not y.is_contiguous():
        y = y.to(work_dtype).contiguous()
    if out is not None and out.is_contiguous() and out.dtype == work_dtype:
        x = out
    else:
        x = torch.empty_like(y)
    counts = _run_kernel(y, x, lam_arg, tol, max_iter, num_threads)
    if stats is not None:
        stats.update(zip(("n2", "n3", "n4", "walks", "capped"), (int(c) for c in counts)))
    if out is not None:
        if x is not out:
            out.copy_(x)
        return out
    return x if x.dtype == W.dtype else x.to(W.dtype)


def prox_24_(W: torch.Tensor, lam: Lam, **kwargs) -> torch.Tensor:
    """In-place :func:`prox_24` (``W`` is overwritten and returned); for use right after an optimizer step."""
    with torch.no_grad():
        return prox_24(W.data if isinstance(W, torch.nn.Parameter) else W, lam, out=W.data, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Pure-torch implementation of the same algorithm (any device; float64 inside)


def prox_24_torch(W: torch.Tensor, lam: Lam, *, tol: float = DEFAULT_TOL,
                  max_iter: int = DEFAULT_MAX_ITER) -> torch.Tensor:
    """:func:`prox_24` in vectorised torch operations (the path for CUDA and other devices).

    It runs the same algorithm as the kernel (sorted candidates, safeguarded Newton iterations,
    certificates) in float64 on whole tensors, with a vectorised certified grid refinement in place
    of the kernel's sequential walk for the rare groups that need it.
    """
    _check_args(W, tol, max_iter)
    dev = W.device
    y = W.detach().reshape(-1, 4).to(torch.float64)
    lam_g = _lam_per_group(lam.detach() if isinstance(lam, torch.Tensor) else lam, W, torch.float64, dev)
    lam_g = lam_g.reshape(-1).to(dev)
    x = _prox_groups_torch(y, lam_g, float(tol), int(max_iter))
    return x.reshape(W.shape).to(W.dtype)


_TINY = 1e-300


def _g_eval(s, m, d, lam, z3):
    r1 = 1.0 / (1.0 + s)
    r2 = torch.where(d > 0, 1.0 / (1.0 - s).clamp_min(_TINY), torch.zeros_like(s))
    a, b = m * r1, d * r2
    l2 = lam * lam
    G = s - lam * z3 + l2 * (a * a - b * b)
    Gp = 1.0 - 2.0 * l2 * (a * a * r1 + b * b * r2)
    return G, Gp, r1, r2


def _sp3(z1, z2, z3, lam, tol, max_iter):
    """Vectorised 3-sparse solve (safeguarded monotone Newton on G).  Returns a dict of tensors."""
    m, d = 0.5 * (z1 + z2), 0.5 * (z1 - z2)
    valid = (z3 > 0) & (lam > 0)
    z1s = torch.where(z1 > 0, z1, torch.ones_like(z1))
    se = torch.minimum(lam * z3, z2 / z1s)
    k = torch.sqrt(d / torch.where(m > 0, m, torch.ones_like(m)))
    s = torch.minimum(((1 - k) / (1 + k)).clamp_min(0.0), se)
    G, Gp, r1, r2 = _g_eval(s, m, d, lam, z3)
    ok = valid & (Gp > 0)
    right = G < 0
    act = ok & (G != 0)
    for _ in range(max_iter):
        if not bool(act.any()):
            break
        ns = s - G / Gp
        leave = torch.where(right, ~(ns <= se), ~(ns >= 0))
        noprog = torch.where(right, ~(ns > s), ~(ns < s))
        done = (ns - s).abs() <= tol * ns
        upd = act & ~leave & ~noprog
        sn = torch.where(upd, ns, s)
        Gn, Gpn, q1, q2 = _g_eval(sn, m, d, lam, z3)
        bad = upd & ~(Gpn > 0)
        ok = ok & ~((act & leave) | bad)
        s = sn
        r1 = torch.where(upd, q1, r1)
        r2 = torch.where(upd, q2, r2)
        G = torch.where(upd, Gn, G)
        Gp = torch.where(upd, Gpn, Gp)
        act = upd & ~bad & ~done & (Gn != 0)
    lam_s = torch.where(lam > 0, lam, torch.ones_like(lam))
    u1, u2, u3 = m * r1 + d * r2, m * r1 - d * r2, s / lam_s
    ok = ok & (u2 > 0) & (u3 > 0)
    return dict(ok=ok, s=s, u1=u1, u2=u2, u3=u3, r1=r1, r2=r2, gp=Gp)


def _obj4(z, w1, w2, w3, w4, lam):
    e3 = w1 * w2 * (w3 + w4) + w3 * w4 * (w1 + w2)
    return 0.5 * ((w1 - z[:, 0]) ** 2 + (w2 - z[:, 1]) ** 2 + (w3 - z[:, 2]) ** 2 + (w4 - z[:, 3]) ** 2) + lam * e3


def _make_pt(z, lam, t, q):
    """The point of the inner path at t from the inner solution q (see make_pt in the kernel)."""
    c = t + lam * t * t
    w1, w2, w3 = q["u1"] - t, q["u2"] - t, q["u3"] - t
    E = w1 * w2 + w1 * w3 + w2 * w3
    R = t - z[:, 3] + lam * E
    mc, d = 0.5 * (z[:, 0] + z[:, 1]) + c, 0.5 * (z[:, 0] - z[:, 1])
    r1, r2, gp = q["r1"], q["r2"], q["gp"]
    dGdc = -lam + 2.0 * lam * lam * mc * r1 * r1
    dsdc = -dGdc / gp
    du1 = r1 + (-mc * r1 * r1 + d * r2 * r2) * dsdc
    du2 = r1 + (-mc * r1 * r1 - d * r2 * r2) * dsdc
    du3 = dsdc / lam
    dcdt = 1.0 + 2.0 * lam * t
    dw1, dw2, dw3 = du1 * dcdt - 1.0, du2 * dcdt - 1.0, du3 * dcdt - 1.0
    Rp = 1.0 + lam * (dw1 * (w2 + w3) + dw2 * (w1 + w3) + dw3 * (w1 + w2))
    D = _obj4(z, w1, w2, w3, t, lam)
    return dict(ok=q["ok"], t=t, s=q["s"], w1=w1, w2=w2, w3=w3, E=E, R=R, Rp=Rp, D=D, sp=dsdc * dcdt)


def _inner(z, lam, t, tol, max_iter):
    c = t + lam * t * t
    q = _sp3(z[:, 0] + c, z[:, 1] + c, z[:, 2] + c, lam, tol, max_iter)
    return _make_pt(z, lam, t, q)


def _dense_ok(p):
    return p["ok"] & (p["t"] > 0) & (p["w3"] >= p["t"] * (1 - 1e-12)) & (p["Rp"] >= -1e-10) & (p["w2"] > 0)


def _dense_newton(z, lam, s, t, tol, max_iter):
    """Newton's method on (s, t) (see dense_newton in the kernel); returns (good, w1, w2, w3, t)."""
    m, d = 0.5 * (z[:, 0] + z[:, 1]), 0.5 * (z[:, 0] - z[:, 1])
    L2, il = lam * lam, 1.0 / lam
    act = torch.ones_like(s, dtype=torch.bool)
    ok = act.clone()
    last = torch.zeros_like(act)
    zero = torch.zeros_like(s)
    o1, o2, o3, gs_o, f2t_o, f2s_o, f1t_o = zero, zero, zero, zero, zero, zero, zero
    for it in range(max_iter + 2):
        c, cp = t + lam * t * t, 1.0 + 2.0 * lam * t
        mc = m + c
        q1 = 1.0 / (1.0 + s)
        q2 = torch.where(d > 0, 1.0 / (1.0 - s).clamp_min(_TINY), zero)
        a, b = mc * q1, d * q2
        F1 = s - lam * (z[:, 2] + c) + L2 * (a * a - b * b)
        gs = 1.0 - 2.0 * L2 * (a * a * q1 + b * b * q2)
        F1t = (2.0 * L2 * mc * q1 * q1 - lam) * cp
        w1, w2, w3 = a + b - t, a - b - t, s * il - t
        S1, S2, S3 = w2 + w3, w1 + w3, w1 + w2
        F2 = t - z[:, 3] + lam * (w1 * w2 + w1 * w3 + w2 * w3)
        w1s, w2s = d * q2 * q2 - mc * q1 * q1, -mc * q1 * q1 - d * q2 * q2
        F2s = lam * (w1s * S1 + w2s * S2 + il * S3)
        F2t = 1.0 + lam * ((q1 * cp - 1.0) * (S1 + S2) - S3)
        det = gs * F2t - F1t * F2s
        ds = (F1t * F2 - F1 * F2t) / det
        dt = (F2s * F1 - gs * F2) / det
        fin = act & last
        o1, o2, o3 = torch.where(fin, w1, o1), torch.where(fin, w2, o2), torch.where(fin, w3, o3)
        gs_o, f2t_o = torch.where(fin, gs, gs_o), torch.where(fin, F2t, f2t_o)
        f2s_o, f1t_o = torch.where(fin, F2s, f2s_o), torch.where(fin, F1t, f1t_o)
        step = act & ~last
        sn, tn = s + ds, t + dt
        bad = step & (~((sn > 0) & (sn < 1) & (tn > 0)) | ~(det != 0))
        conv = (ds.abs() <= tol * sn) & (dt.abs() <= tol * tn)
        ok = ok & ~bad
        mv = step & ~bad
        s, t = torch.where(mv, sn, s), torch.where(mv, tn, t)
        act = mv
        last = mv & conv
        if not bool(act.any()):
            break
        if it >= max_iter:
            ok = ok & ~act
            act = torch.zeros_like(act)
            break
    Rp = f2t_o - f2s_o * f1t_o / gs_o
    good = ok & ~act & (gs_o > 0) & (o2 > 0) & (t > 0) & (o3 >= t * (1 - 1e-12)) & (Rp >= -1e-10)
    return good, o1, o2, o3, t


def _screen_dense(z, lam, rounds=8):
    """Vectorised interval certificate (see screen_dense in the kernel): True = no dense point."""
    z0, z1, z2, z3 = z.unbind(1)
    L0 = L1 = L2 = L3 = torch.zeros_like(z0)
    U0, U1, U2, U3 = z0.clone(), z1.clone(), z2.clone(), z3.clone()
    il = 1.0 / lam
    cert = torch.zeros_like(z0, dtype=torch.bool)
    for _ in range(rounds):
        U0 = torch.minimum(torch.minimum(U0, z0 - lam * (L1 * L2 + L1 * L3 + L2 * L3)), il - L1)
        U1 = torch.minimum(torch.minimum(torch.minimum(U1, U0), z1 - lam * (L0 * L2 + L0 * L3 + L2 * L3)), 0.5 * il)
        U2 = torch.minimum(torch.minimum(U2, U1), z2 - lam * (L0 * L1 + L0 * L3 + L1 * L3))
        U3 = torch.minimum(torch.minimum(U3, U2), z3 - lam * (L0 * L1 + L0 * L2 + L1 * L2))
        cert = cert | ~(U3 > 0) | (U0 < L0) | (U1 < L1) | (U2 < L2) | (U3 < L3)
        L3 = torch.maximum(L3, z3 - lam * (U0 * U1 + U0 * U2 + U1 * U2))
        L2 = torch.maximum(torch.maximum(L2, L3), z2 - lam * (U0 * U1 + U0 * U3 + U1 * U3))
        L1 = torch.maximum(torch.maximum(L1, L2), z1 - lam * (U0 * U2 + U0 * U3 + U2 * U3))
        L0 = torch.maximum(torch.maximum(L0, L1), z0 - lam * (U1 * U2 + U1 * U3 + U2 * U3))
        cert = cert | (lam * (L0 + L1) > 1) | (U0 < L0) | (U1 < L1) | (U2 < L2) | (U3 < L3)
    return cert


def _take(p, idx):
    return {k: v[idx] for k, v in p.items()}


def _solve_brackets(z, lam, a, b, tol, max_iter):
    """Vectorised safeguarded Newton on R over brackets [a.t, b.t] with R(a) < 0 <= R(b)."""
    ta, tb = a["t"].clone(), b["t"].clone()
    use_a = -a["R"] < b["R"]
    t0 = torch.where(use_a, ta, tb)
    R0 = torch.where(use_a, a["R"], b["R"])
    Rp0 = torch.where(use_a, a["Rp"], b["Rp"])
    t = t0 - R0 / Rp0
    t = torch.where((Rp0 > 0) & (t > ta) & (t < tb), t, 0.5 * (ta + tb))
    act = torch.ones_like(t, dtype=torch.bool)
    for _ in range(max_iter):
        p = _inner(z, lam, t, tol, max_iter)
        okp = p["ok"]
        act = act & okp  # a hole in the domain of the inner solution: give up on that lane
        neg = p["R"] < 0
        ta = torch.where(act & neg, t, ta)
        tb = torch.where(act & ~neg, t, tb)
        tn = t - p["R"] / p["Rp"]
        tn = torch.where((p["Rp"] > 0) & (tn > ta) & (tn < tb), tn, 0.5 * (ta + tb))
        done = ((tn - t).abs() <= tol * tn) | ((tb - ta) <= tol * tb) | (p["R"] == 0)
        t = torch.where(act & (p["R"] != 0), tn, t)
        act = act & ~done
        if not bool(act.any()):
            break
    return _inner(z, lam, t, tol, max_iter)


def _dense_slow(z, lam, best_v, best_w, tb, tol, max_iter, n_grid=16, depth=48):
    """Vectorised certified refinement of the inner path over [0, tb] for the rare groups that the
    certificates do not settle.  Updates best_v/best_w in place (tensors indexed by lane)."""
    M = z.shape[0]
    eps = 1e-16
    z4 = z[:, 3]
    found = torch.zeros(M, dtype=torch.bool, device=z.device)

    def offer(lanes, p):
        feas = p["ok"] & (p["w2"] >= 0) & (p["w3"] >= 0) & (p["t"] >= 0)
        D = torch.where(feas, p["D"], torch.full_like(p["D"], math.inf))
        new_v = best_v.clone().scatter_reduce_(0, lanes, D, reduce="amin", include_self=True)
        win = feas & (D < best_v[lanes]) & (D == new_v[lanes])
        if bool(win.any()):
            ln = lanes[win]
            best_w[ln] = torch.stack([p["w1"][win], p["w2"][win], p["w3"][win], p["t"][win]], 1)
            best_v[ln] = D[win]

    # level 0: a grid
    lanes0 = torch.arange(M, device=z.device).repeat_interleave(n_grid + 1)
    frac = torch.arange(n_grid + 1, device=z.device, dtype=z.dtype).repeat(M) / n_grid
    tg = tb[lanes0] * frac
    P = _inner(z[lanes0], lam[lanes0], tg, tol, max_iter)
    offer(lanes0, P)
    ia = torch.arange(M * (n_grid + 1), device=z.device).reshape(M, n_grid + 1)
    A = _take(P, ia[:, :-1].reshape(-1))
    B = _take(P, ia[:, 1:].reshape(-1))
    lanes = torch.arange(M, device=z.device).repeat_interleave(n_grid)
    for _ in range(depth):
        if lanes.numel() == 0:
            break
        keep = ~found[lanes]
        lanes, A, B = lanes[keep], _take(A, keep), _take(B, keep)
        if lanes.numel() == 0:
            break
        # brackets
        br = A["ok"] & B["ok"] & (A["R"] < 0) & (B["R"] >= 0)
        if bool(br.any()):
            bl = lanes[br]
            r = _solve_brackets(z[bl], lam[bl], _take(A, br), _take(B, br), tol, max_iter)
            offer(bl, r)
            good = _dense_ok(r)
            if bool(good.any()):
                found[bl[good]] = True
            keep = ~found[lanes]
            lanes, A, B = lanes[keep], _take(A, keep), _take(B, keep)
            if lanes.numel() == 0:
                break
        H = B["t"] - A["t"]
        zz = z4[lanes]
        vstar = best_v[lanes]
        hD = (A["D"] - vstar + eps).clamp_min(0.0) / (zz - A["t"]).clamp_min(_TINY)
        lbR = A["t"] - zz + lam[lanes] * B["E"]
        Aa = (-lbR).clamp_min(0.0)
        Bb = (A["R"] + H).clamp_min(0.0)
        x = torch.where(Aa + Bb > 0, (A["D"] - B["D"] + Bb * H) / (Aa + Bb), torch.zeros_like(H))
        x = torch.minimum(x.clamp_min(0.0), H)
        lb = torch.maximum(A["D"] - Aa * x, B["D"] - Bb * (H - x))
        both = A["ok"] & B["ok"]
        cert = (
            ~A["ok"]  # past the end of the domain of the inner solution
            | (A["ok"] & (A["w3"] < A["t"]))  # past the sorted region
            | (hD >= H)
            | (both & ((lbR >= 0) | (lb >= vstar - eps)))
            | (H <= 1e-15 * tb[lanes])
        )
        open_ = ~cert
        if not bool(open_.any()):
            break
        lanes, A, B = lanes[open_], _take(A, open_), _take(B, open_)
        tm = 0.5 * (A["t"] + B["t"])
        Mid = _inner(z[lanes], lam[lanes], tm, tol, max_iter)
        offer(lanes, Mid)
        lanes = torch.cat([lanes, lanes])
        A, B = ({k: torch.cat([A[k], Mid[k]]) for k in A}, {k: torch.cat([Mid[k], B[k]]) for k in B})


_IDENT_REL = 2.0 ** -54  # below half an ulp of a double, relative


def _prox_groups_torch(y: torch.Tensor, lam: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """y: (G, 4) float64, lam: (G,) float64 (same device).  Returns x (G, 4) float64."""
    G = y.shape[0]
    if G == 0:
        return y.clone()
    a = y.abs()
    zs, idx = torch.sort(a, dim=1, descending=True, stable=True)
    finite = torch.isfinite(y).all(1)
    copy = ~finite | ~(lam > 0) | ~(zs[:, 0] > 0)
    sc = torch.where(copy, torch.ones_like(lam), zs[:, 0])
    z = zs / sc[:, None]
    ln = lam * sc
    z2, z3, z4 = z[:, 1], z[:, 2], z[:, 3]
    best_w = torch.stack([torch.ones_like(z2), z2, torch.zeros_like(z2), torch.zeros_like(z2)], 1)
    best_v = 0.5 * (z3 * z3 + z4 * z4)
    # certificates for the 2-sparse point (screen2, screen3 of the kernel)
    lns = torch.where(ln > 0, ln, torch.ones_like(ln))
    rmax2 = z3 * z3 + z4 * z4
    c0 = ln * z2 - z3
    b2 = ln * (1 + z2) - 0.7071067811865476
    r2 = torch.minimum((b2 / (2 * lns)).clamp_min(0.0), torch.sqrt(rmax2))
    s2 = (rmax2 <= z2 * z2) & (ln * r2 * r2 - b2 * r2 + c0 >= 0)
    b3 = ln * (1 + z2) - 1.0
    r3 = torch.minimum((b3 / (2 * lns)).clamp_min(0.0), z3)
    s3 = ~(z4 > 0) & (ln * r3 * r3 - b3 * r3 + c0 >= 0)
    # identity: lam too small to change any non-zero coordinate (see the kernel's stage 1)
    zmin = torch.where(z4 > 0, z4, z3)
    ident = (z3 > 0) & (3.0 * ln <= _IDENT_REL * zmin) & (zmin * zmin > 8.0 * ln)
    copy = copy | ident
    need = ~copy & (z3 > 0) & torch.isfinite(ln) & ~s2 & ~s3
    sub = need.nonzero().squeeze(1)
    if sub.numel():
        zz, ll = z[sub], ln[sub]
        one = torch.ones_like(ll)
        q = _sp3(one, zz[:, 1], zz[:, 2], ll, tol, max_iter)
        u1, u2, u3 = q["u1"], q["u2"], q["u3"]
        v3 = 0.5 * ((u1 - 1) ** 2 + (u2 - zz[:, 1]) ** 2 + (u3 - zz[:, 2]) ** 2 + zz[:, 3] ** 2) + ll * u1 * u2 * u3
        bv, bw = best_v[sub], best_w[sub]
        take = q["ok"] & (v3 < bv)
        bv = torch.where(take, v3, bv)
        bw = torch.where(take[:, None], torch.stack([u1, u2, u3, torch.zeros_like(u1)], 1), bw)
        p0 = _make_pt(zz, ll, torch.zeros_like(ll), q)
        dense_lanes = q["ok"] & (zz[:, 3] > 0)
        cls_newton = dense_lanes & (p0["R"] < 0)
        cls_slow = dense_lanes & (p0["R"] >= 0) & (p0["Rp"] < 0)
        slow = cls_slow.clone()
        nl = cls_newton.nonzero().squeeze(1)
        if nl.numel():
            pn = _take(p0, nl)
            zl, lamn = zz[nl], ll[nl]
            t1 = torch.where(pn["Rp"] > 0, -pn["R"] / pn["Rp"], 0.5 * zl[:, 3])
            t1 = torch.minimum(t1, zl[:, 3])
            s1 = pn["s"] + pn["sp"] * t1
            s1 = torch.where((s1 > 0) & (s1 < 1), s1, pn["s"])
            good, o1, o2, o3, t = _dense_newton(zl, lamn, s1, t1, tol, max_iter)
            v4 = _obj4(zl, o1, o2, o3, t, lamn)
            take4 = good & (v4 < bv[nl])
            bv[nl] = torch.where(take4, v4, bv[nl])
            bw[nl] = torch.where(take4[:, None], torch.stack([o1, o2, o3, t], 1), bw[nl])
            slow[nl[~good]] = True
        sl = slow.nonzero().squeeze(1)
        if sl.numel():
            zl, lsl = zz[sl], ll[sl]
            scr = _screen_dense(zl, lsl) & cls_slow[sl]
            rest = sl[~scr]
            if rest.numel():
                vv, ww = bv[rest].clone(), bw[rest].clone()
                tb = torch.minimum(zz[rest, 3], u3[rest])
                _dense_slow(zz[rest], ll[rest], vv, ww, tb, tol, max_iter)
                bv[rest], bw[rest] = vv, ww
        best_v[sub], best_w[sub] = bv, bw
    out_sorted = best_w * sc[:, None]
    x = torch.zeros_like(y).scatter_(1, idx, out_sorted)
    # exact inputs for a 2-sparse result, and |x| <= |y| despite rounding
    two = (best_w[:, 2] == 0) & (best_w[:, 3] == 0)
    keep2 = torch.zeros_like(y, dtype=torch.bool).scatter_(1, idx[:, :2], True)
    x = torch.where(two[:, None], torch.where(keep2, a, torch.zeros_like(a)), torch.minimum(x, a))
    x = torch.where(torch.signbit(y), -x, x)
    return torch.where(copy[:, None], y, x)


# ---------------------------------------------------------------------------------------------------
# The paper's EnumALM, for comparison


def prox_24_alm(W: torch.Tensor, lam: Lam, *, tol: float = 1e-12, max_iter: int = 1000,
                init: str = "z") -> torch.Tensor:
    r"""EnumALM (ProxSparse, Algorithms 2-3) with a per-group stopping rule, for comparison.

    Candidates: the 2-sparse point, and alternating minimisation (cyclic non-negative soft-thresholding
    :math:`w_i \leftarrow \max(0, z_i - \lambda \partial_i \mathrm{Reg}(w))`) on the top three and on all
    four sorted magnitudes; the candidate of least objective wins.  ``init="z"`` starts at the sorted
    magnitudes and sweeps coordinates 1..S (the paper); ``init="zero"`` starts at zero and sweeps from
    the last coordinate (the authors' code).  A group stops when the largest change of a sweep is below
    ``tol`` times its largest magnitude.  Not exact: ALM can stop at a boundary critical point while
    a better interior one exists (see the module docstring); :func:`prox_24` is exact.
    """
    _check_args(W, tol, max_iter)
    y = W.detach().reshape(-1, 4).to(torch.float64)
    lam_g = _lam_per_group(lam, W, torch.float64, W.device).reshape(-1)
    a = y.abs()
    z, idx = torch.sort(a, dim=1, descending=True, stable=True)
    scale = z[:, :1].clamp_min(_TINY)

    def alm(S: int) -> torch.Tensor:
        w = z.clone() if init == "z" else torch.zeros_like(z)
        w[:, S:] = 0
        order = range(S) if init == "z" else range(S - 1, -1, -1)
        act = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        for _ in range(max_iter):
            prev = w.clone()
            for i in order:
                others = [j for j in range(S) if j != i]
                if S == 3:
                    g = w[:, others[0]] * w[:, others[1]]
                else:
                    o = w[:, others]
                    g = o[:, 0] * o[:, 1] + o[:, 0] * o[:, 2] + o[:, 1] * o[:, 2]
                w[:, i] = torch.where(act, (z[:, i] - lam_g * g).clamp_min(0.0), w[:, i])
            change = (w - prev).abs().amax(1)
            act = act & (change > tol * scale[:, 0])
            if not bool(act.any()):
                break
        return w

    cands = [torch.cat([z[:, :2], torch.zeros_like(z[:, 2:])], 1), alm(3), alm(4)]
    vals = torch.stack([0.5 * ((c - z) ** 2).sum(1) + lam_g * reg_24(c).squeeze(-1) for c in cands])
    best = vals.argmin(0)
    w = torch.stack(cands)[best, torch.arange(z.shape[0], device=z.device)]
    x = torch.zeros_like(y).scatter_(1, idx, w)
    x = torch.where(torch.signbit(y), -x, x)
    x = torch.where((lam_g > 0)[:, None], x, y)
    return x.reshape(W.shape).to(W.dtype)


# ---------------------------------------------------------------------------------------------------
# The frozen-weight regularizer


def _frozen_denominator(W0: torch.Tensor, eps: float) -> torch.Tensor:
    sgn = torch.where(W0 >= 0, torch.ones_like(W0), -torch.ones_like(W0))
    return W0 + eps * sgn


def reg_frozen(W: torch.Tensor, W0: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    r"""ProxSparse's frozen-weight regularizer
    :math:`\mathrm{Reg}_{W_0}(W) = \big\|\frac{W}{W_0 + \epsilon\,\mathrm{sign}(W_0)} \odot (W - W_0)\big\|_F^2`.

    It is zero iff every non-zero weight equals its original value, so it pulls surviving weights
    back to :math:`W_0` and leaves pruned ones alone.  ``sign`` is taken as +1 for :math:`W_0 \ge 0` and
    -1 otherwise, as in the authors' code (``custom_sign``), so the denominator has magnitude
    :math:`|W_0| + \epsilon`; the paper's text defines sign as 1 for :math:`\ge 0` and 0 otherwise,
    which for negative :math:`W_0` would not keep the denominator away from zero.  Default
    :math:`\epsilon = 0.1` (the authors' command-line default).
    """
    r = W / _frozen_denominator(W0, eps)
    return ((r * (W - W0)) ** 2).sum()


def reg_frozen_grad(W: torch.Tensor, W0: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    r"""Gradient of :func:`reg_frozen`: :math:`2 c\, w (w - w_0)(2w - w_0)` elementwise with
    :math:`c = 1/(w_0 + \epsilon\,\mathrm{sign}(w_0))^2` (ProxSparse uses it in the gradient step)."""
    c = _frozen_denominator(W0, eps) ** -2
    return 2 * c * W * (W - W0) * (2 * W - W0)


def add_reg_frozen_grad_(G: torch.Tensor, W: torch.Tensor, W0: torch.Tensor, lam: float, eps: float = 0.1,
                         chunk: int = 1 << 17) -> torch.Tensor:
    r"""``G += lam * reg_frozen_grad(W, W0, eps)`` in place, a cache-sized chunk at a time.

    The training loop calls it on every weight after every backward pass; written as one expression the
    gradient makes about a dozen full-size passes over memory, here each chunk's temporaries stay in cache
    and memory sees one read of ``W``, ``W0`` and ``G`` and one write of ``G``.  Uses
    :math:`|w_0 + \epsilon\,\mathrm{sign}(w_0)| = |w_0| + \epsilon`.
    """
    if not (G.is_contiguous() and W.is_contiguous() and W0.is_contiguous()):
        return G.add_(reg_frozen_grad(W.detach(), W0, eps), alpha=lam)
    g, w, w0 = G.view(-1), W.detach().view(-1), W0.view(-1)
    with torch.no_grad():
        for s in range(0, w.numel(), chunk):
            ws, w0s = w[s:s + chunk], w0[s:s + chunk]
            u = ws - w0s                   # w - w0
            v = u + ws                     # 2w - w0
            u.mul_(v).mul_(ws)             # w (w - w0)(2w - w0)
            u.div_(w0s.abs().add_(eps).square_())
            g[s:s + chunk].add_(u, alpha=2 * lam)
    return G


def prox_frozen(V: torch.Tensor, W0: torch.Tensor, lam: Union[float, torch.Tensor], eps: float = 0.1) -> torch.Tensor:
    r"""Exact proximal operator of :math:`\lambda\,\mathrm{Reg}_{W_0}`, elementwise:
    :math:`\arg\min_w \tfrac12 (w - v)^2 + \lambda c\, w^2 (w - w_0)^2`, :math:`c = 1/(w_0 + \epsilon\,\mathrm{sign}(w_0))^2`.

    The regularizer is separable and smooth (a quartic per coordinate), so ProxSparse simply adds its
    gradient to the loss gradient; it is also proximal-friendly, which this function provides.  With
    :math:`k = 2\lambda c` and :math:`x = w - w_0/2` the stationarity condition is the depressed cubic
    :math:`x^3 + p x + q = 0`, :math:`p = 1/(2k) - w_0^2/4`, :math:`q = (w_0 - 2v)/(4k)` (the objective is
    a tilted double well centred at :math:`w_0/2`).  Its real roots come in closed form (Cardano when
    :math:`4p^3 + 27q^2 \ge 0`, otherwise the trigonometric form with three real roots), each polished by
    two Newton steps; the root of least objective is returned.  ``lam`` is a non-negative scalar or a
    tensor broadcastable to ``V``.  Works on any device; computed in float64.
    """
    if V.shape != W0.shape:
        raise ValueError("V and W0 must have the same shape")
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=V.device)
    if not bool(torch.isfinite(lam_t).all()) or bool((lam_t < 0).any()):
        raise ValueError("lam must be finite and non-negative")
    v, w0 = V.double(), W0.double()
    c = _frozen_denominator(w0, eps) ** -2
    k = 2.0 * lam_t * c
    kk = torch.where(k > 0, k, torch.ones_like(k))
    # scale-free variables: x = w - w0/2, cubic x^3 + p x + q = 0 (only where k > 0)
    p = 1.0 / (2.0 * kk) - w0 * w0 / 4.0
    q = (w0 - 2.0 * v) / (4.0 * kk)
    disc = 4.0 * p ** 3 + 27.0 * q * q
    # one real root (Cardano, in the cancellation-free form)
    sq = torch.sqrt(torch.clamp(q * q / 4.0 + p ** 3 / 27.0, min=0.0))
    A = -torch.sign(q) * torch.pow(q.abs() / 2.0 + sq, 1.0 / 3.0)
    A = torch.where(q == 0, torch.pow(torch.clamp(sq, min=0.0), 1.0 / 3.0), A)
    x_one = torch.where(A != 0, A - p / (3.0 * torch.where(A != 0, A, torch.ones_like(A))), torch.zeros_like(A))
    # three real roots (p < 0)
    pn = torch.clamp(-p, min=_TINY)
    rr = 2.0 * torch.sqrt(pn / 3.0)
    arg = torch.clamp((3.0 * q / (2.0 * -pn)) * torch.sqrt(3.0 / pn), -1.0, 1.0)
    th = torch.acos(arg) / 3.0
    roots = [rr * torch.cos(th - 2.0 * math.pi * j / 3.0) for j in range(3)]
    three = disc < 0
    cands = [torch.where(three, r, x_one) for r in roots]

    def f(x):  # objective in x (up to a constant)
        w = x + w0 / 2.0
        return 0.5 * (w - v) ** 2 + 0.5 * kk * (w * (w - w0)) ** 2

    def polish(x):
        for _ in range(2):
            fp = 2.0 * kk * x ** 3 + (1.0 - kk * w0 * w0 / 2.0) * x + (w0 / 2.0 - v)
            fpp = 6.0 * kk * x * x + (1.0 - kk * w0 * w0 / 2.0)
            step = torch.where(fpp > 0, fp / torch.where(fpp > 0, fpp, torch.ones_like(fpp)), torch.zeros_like(fp))
            x = x - step
        return x

    cands = [polish(x) for x in cands]
    vals = torch.stack([f(x) for x in cands])
    xs = torch.stack(cands)
    best = torch.gather(xs, 0, vals.argmin(0, keepdim=True)).squeeze(0)
    w = torch.where(k > 0, best + w0 / 2.0, v)
    return w.to(V.dtype)
