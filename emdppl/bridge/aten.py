r"""Torch functions lowered to JAX: an aten-level graph translated op by op into ``jax.numpy``.

:func:`lower_to_jax` records a torch function of one flat tensor with
``torch.fx.experimental.proxy_tensor.make_fx`` (of ``torch.func.functionalize``, so in-place ops
become pure ones) on a real example: what runs is the dispatcher's aten ops, with every Python
layer above them (Pyro's handlers, ``torch.distributions``, the model's own code) already
executed. Tensors the function closes over (the data) become constants. Each aten op is
then replaced by its ``jax.numpy`` / ``jax.lax`` equivalent (``OPS``), giving a pure JAX
function that ``jax.jit``, ``jax.vmap`` and ``jax.grad`` transform natively: no host round
trip, the gradient by JAX's autodiff.

What the recording cannot see is Python control flow on the values: a branch taken on the
example is baked in. Callers therefore check the lowered function against torch at several
points (:func:`agrees_with_torch`) before using it, and keep the host callback
(:mod:`emdppl.bridge.callback`) for functions that do not lower or do not agree. An op
outside ``OPS`` raises :class:`LoweringError` naming it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = [
    "OPS",
    "LoweredLogDensity",
    "LoweringError",
    "agrees_with_torch",
    "jax_dtype",
    "lower_to_jax",
]


class LoweringError(ValueError):
    """A torch function that cannot be lowered to JAX (an op without a translation, or a failed
    recording) or whose lowered form does not agree with it."""


def jax_dtype(torch_dtype: Any) -> Any:
    """The JAX dtype of a torch dtype, as JAX holds it: 64-bit types become 32-bit ones while
    JAX's x64 mode is off (the lowered function then computes in float32, as JAX does with
    float64 data)."""
    import torch

    if torch_dtype is torch.bool:
        return jnp.dtype(bool)
    return jax.dtypes.canonicalize_dtype(jnp.dtype(str(torch_dtype).removeprefix("torch.")))


def _dtype(dtype: Any, default: Any = None) -> Any:
    import torch

    if dtype is None:
        return jax_dtype(torch.get_default_dtype()) if default is None else default
    return jax_dtype(dtype)


def _like(x: jax.Array, fill: Any, dtype: Any = None, **_: Any) -> jax.Array:
    return jnp.full(jnp.shape(x), fill, _dtype(dtype, jnp.result_type(x)))


def _full(size: Sequence[int], fill: Any, dtype: Any = None, **_: Any) -> jax.Array:
    return jnp.full(tuple(size), fill, _dtype(dtype))


def _to_copy(x: jax.Array, dtype: Any = None, **_: Any) -> jax.Array:
    return x if dtype is None else x.astype(jax_dtype(dtype))


def _axes(x: jax.Array, dim: Any) -> tuple[int, ...] | None:
    """torch's ``dim`` (an int, a list, or ``None`` / ``[]`` for all) as numpy axes."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    return tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)


def _reduction(fn: Callable) -> Callable:
    def reduce(x, dim=None, keepdim=False, dtype=None, **_: Any):
        out = fn(x, axis=_axes(x, dim), keepdims=keepdim)
        return out if dtype is None else out.astype(jax_dtype(dtype))

    return reduce


def _expand(x: jax.Array, size: Sequence[int], implicit: bool = False) -> jax.Array:
    lead = len(size) - x.ndim
    shape = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(size)]
    return jnp.broadcast_to(x, shape)


def _split_with_sizes(x: jax.Array, sizes: Sequence[int], dim: int = 0) -> list:
    return jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=dim)


def _split(x: jax.Array, size: int, dim: int = 0) -> list:
    return jnp.split(x, list(range(size, x.shape[dim], size)), axis=dim)


def _slice(x: jax.Array, dim: int = 0, start=None, end=None, step: int = 1) -> jax.Array:
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def _select(x: jax.Array, dim: int, index: int) -> jax.Array:
    return x[(slice(None),) * (dim % x.ndim) + (index,)]


def _index(x: jax.Array, indices: Sequence[Any]) -> jax.Array:
    return x[tuple(slice(None) if i is None else i for i in indices)]


def _squeeze(x: jax.Array, dim: Any = None) -> jax.Array:
    axes = _axes(x, dim)
    if axes is None:
        return jnp.squeeze(x)
    return jnp.squeeze(x, tuple(a for a in axes if x.shape[a] == 1))


def _softplus(x: jax.Array, beta: float = 1.0, threshold: float = 20.0) -> jax.Array:
    # torch: x where beta * x > threshold, else log1p(exp(beta x)) / beta
    return jnp.where(beta * x > threshold, x, jax.nn.softplus(beta * x) / beta)


def _bce_with_logits(x, target, weight=None, pos_weight=None, reduction: int = 1):
    if pos_weight is not None:
        raise LoweringError("binary_cross_entropy_with_logits with pos_weight")
    loss = jnp.maximum(x, 0) - x * target + jnp.log1p(jnp.exp(-jnp.abs(x)))
    if weight is not None:
        loss = loss * weight
    return {0: lambda: loss, 1: lambda: jnp.mean(loss), 2: lambda: jnp.sum(loss)}[reduction]()


def _clamp(x, min=None, max=None):  # noqa: A002 (torch's names)
    return jnp.clip(x, min, max)


def _cholesky_ex(x, upper: bool = False, check_errors: bool = False):
    lower = jnp.linalg.cholesky(x)
    factor = jnp.swapaxes(lower, -1, -2) if upper else lower
    return factor, jnp.zeros(x.shape[:-2], jnp.int32)


def _solve_triangular(a, b, upper: bool, left: bool = True, unitriangular: bool = False):
    if not left:
        raise LoweringError("linalg_solve_triangular with left=False")
    return jax.scipy.linalg.solve_triangular(a, b, lower=not upper, unit_diagonal=unitriangular)


def _triangular_solve(b, a, upper=True, transpose=False, unitriangular=False):
    solution = jax.scipy.linalg.solve_triangular(
        a, b, lower=not upper, trans=int(transpose), unit_diagonal=unitriangular
    )
    return solution, a


def _pad(x: jax.Array, pad: Sequence[int], value: float = 0.0) -> jax.Array:
    # torch's pad lists (before, after) pairs from the last axis backwards
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [
        (pad[i], pad[i + 1]) for i in range(len(pad) - 2, -1, -2)
    ]
    return jnp.pad(x, pairs, constant_values=value)


def _slice_scatter(x, src, dim: int = 0, start=None, end=None, step: int = 1):
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, end, step)
    return x.at[tuple(index)].set(src)


def _diagonal_scatter(x, src, offset: int = 0, dim1: int = 0, dim2: int = 1):
    moved = jnp.moveaxis(x, (dim1, dim2), (-2, -1))
    n = min(moved.shape[-2] - max(-offset, 0), moved.shape[-1] - max(offset, 0))
    rows = jnp.arange(n) + max(-offset, 0)
    cols = jnp.arange(n) + max(offset, 0)
    return jnp.moveaxis(moved.at[..., rows, cols].set(src), (-2, -1), (dim1, dim2))


def _diag_embed(x, offset: int = 0, dim1: int = -2, dim2: int = -1):
    n = x.shape[-1] + abs(offset)
    out = jnp.zeros((*x.shape[:-1], n, n), x.dtype)
    out = _diagonal_scatter(out, x, offset, -2, -1)
    return jnp.moveaxis(out, (-2, -1), (dim1, dim2))


def _arange(*args: Any, dtype: Any = None, **_: Any) -> jax.Array:
    out = jnp.arange(*args)
    return out if dtype is None else out.astype(jax_dtype(dtype))


def _alias(x: Any, *_: Any, **__: Any) -> Any:
    return x


_UNARY = {
    "abs": jnp.abs, "acos": jnp.arccos, "acosh": jnp.arccosh, "asin": jnp.arcsin,
    "asinh": jnp.arcsinh, "atan": jnp.arctan, "atanh": jnp.arctanh, "ceil": jnp.ceil,
    "cos": jnp.cos, "cosh": jnp.cosh, "digamma": jsp.digamma, "erf": jsp.erf,
    "erfc": jsp.erfc, "erfinv": jsp.erfinv, "exp": jnp.exp, "exp2": jnp.exp2,
    "expm1": jnp.expm1, "floor": jnp.floor, "isinf": jnp.isinf, "isnan": jnp.isnan,
    "lgamma": jsp.gammaln, "log": jnp.log, "log10": jnp.log10, "log1p": jnp.log1p,
    "log2": jnp.log2, "logical_not": jnp.logical_not, "neg": jnp.negative,
    "reciprocal": jnp.reciprocal, "relu": jax.nn.relu, "round": jnp.round,
    "rsqrt": jax.lax.rsqrt, "sigmoid": jax.nn.sigmoid, "sign": jnp.sign, "sin": jnp.sin,
    "sinh": jnp.sinh, "sqrt": jnp.sqrt, "square": jnp.square, "tan": jnp.tan,
    "tanh": jnp.tanh, "trunc": jnp.trunc, "special_ndtr": jsp.ndtr,
    "special_log_ndtr": jsp.log_ndtr, "special_erfcx": jsp.erfcx, "special_i0e": jsp.i0e,
    "special_i1e": jsp.i1e,
}
_BINARY = {
    "mul": jnp.multiply, "maximum": jnp.maximum, "minimum": jnp.minimum, "fmax": jnp.fmax,
    "fmin": jnp.fmin, "atan2": jnp.arctan2, "eq": jnp.equal, "ne": jnp.not_equal,
    "lt": jnp.less, "le": jnp.less_equal, "gt": jnp.greater, "ge": jnp.greater_equal,
    "logical_and": jnp.logical_and, "logical_or": jnp.logical_or,
    "logical_xor": jnp.logical_xor, "xlogy": jsp.xlogy, "special_xlog1py": jsp.xlog1py,
    "pow": jnp.power, "remainder": jnp.remainder, "fmod": jnp.fmod,
    "bitwise_and": jnp.bitwise_and, "bitwise_or": jnp.bitwise_or,
}

#: aten op name (the overload packet, e.g. ``"add"`` for ``aten.add.Tensor``) -> its JAX
#: translation, called with the op's arguments (JAX arrays in place of tensors).
OPS: dict[str, Callable] = {
    **_UNARY,
    **_BINARY,
    "add": lambda x, y, alpha=1: x + alpha * y,
    "sub": lambda x, y, alpha=1: x - alpha * y,
    "rsub": lambda x, y, alpha=1: y - alpha * x,
    "div": lambda x, y, rounding_mode=None: {
        None: jnp.true_divide, "trunc": lambda a, b: jnp.trunc(a / b), "floor": jnp.floor_divide
    }[rounding_mode](x, y),
    "logit": lambda x, eps=None: jsp.logit(x if eps is None else jnp.clip(x, eps, 1 - eps)),
    "polygamma": lambda n, x: jsp.polygamma(n, x),
    "bitwise_not": jnp.invert,
    "isfinite": jnp.isfinite,
    "where": jnp.where,
    "masked_fill": lambda x, mask, value: jnp.where(mask, jnp.asarray(value, x.dtype), x),
    "clamp": _clamp,
    "clamp_min": lambda x, m: jnp.maximum(x, m),
    "clamp_max": lambda x, m: jnp.minimum(x, m),
    "softplus": _softplus,
    "log_sigmoid_forward": lambda x: (jax.nn.log_sigmoid(x), jnp.zeros((0,), x.dtype)),
    "_log_softmax": lambda x, dim, half_to_float=False: jax.nn.log_softmax(x, axis=dim),
    "_softmax": lambda x, dim, half_to_float=False: jax.nn.softmax(x, axis=dim),
    "binary_cross_entropy_with_logits": _bce_with_logits,
    "sum": _reduction(jnp.sum),
    "mean": _reduction(jnp.mean),
    "prod": _reduction(jnp.prod),
    "amax": _reduction(jnp.max),
    "amin": _reduction(jnp.min),
    "any": _reduction(jnp.any),
    "all": _reduction(jnp.all),
    "max.default": jnp.max,
    "min.default": jnp.min,
    "max.other": jnp.maximum,
    "min.other": jnp.minimum,
    "max.dim": lambda x, dim, keepdim=False: (
        jnp.max(x, axis=dim, keepdims=keepdim), jnp.argmax(x, axis=dim, keepdims=keepdim)
    ),
    "min.dim": lambda x, dim, keepdim=False: (
        jnp.min(x, axis=dim, keepdims=keepdim), jnp.argmin(x, axis=dim, keepdims=keepdim)
    ),
    "var": lambda x, dim=None, correction=None, keepdim=False: jnp.var(
        x, axis=_axes(x, dim), ddof=1 if correction is None else correction, keepdims=keepdim
    ),
    "std": lambda x, dim=None, correction=None, keepdim=False: jnp.std(
        x, axis=_axes(x, dim), ddof=1 if correction is None else correction, keepdims=keepdim
    ),
    "logsumexp": lambda x, dim, keepdim=False: jsp.logsumexp(
        x, axis=_axes(x, dim), keepdims=keepdim
    ),
    "cumsum": lambda x, dim, dtype=None: jnp.cumsum(x, axis=dim, dtype=dtype and jax_dtype(dtype)),
    "cumprod": lambda x, dim, dtype=None: jnp.cumprod(
        x, axis=dim, dtype=dtype and jax_dtype(dtype)
    ),
    "mvlgamma": lambda x, p: jsp.multigammaln(x, p),
    "mv": jnp.matmul,
    "mm": jnp.matmul,
    "bmm": jnp.matmul,
    "matmul": jnp.matmul,
    "dot": jnp.dot,
    "addmm": lambda c, a, b, beta=1, alpha=1: beta * c + alpha * (a @ b),
    "view": lambda x, size: jnp.reshape(x, tuple(size)),
    "_unsafe_view": lambda x, size: jnp.reshape(x, tuple(size)),
    "reshape": lambda x, size: jnp.reshape(x, tuple(size)),
    "expand": _expand,
    "permute": lambda x, dims: jnp.transpose(x, tuple(dims)),
    "t": lambda x: x.T,
    "transpose": lambda x, a, b: jnp.swapaxes(x, a, b),
    "unsqueeze": jnp.expand_dims,
    "squeeze": _squeeze,
    "select": _select,
    "slice": _slice,
    "index": _index,
    "index_select": lambda x, dim, index: jnp.take(x, index, axis=dim),
    "gather": lambda x, dim, index, sparse_grad=False: jnp.take_along_axis(x, index, axis=dim),
    "split_with_sizes": _split_with_sizes,
    "split": _split,
    "unbind": lambda x, dim=0: [jnp.take(x, i, axis=dim) for i in range(x.shape[dim])],
    "cat": lambda tensors, dim=0: jnp.concatenate(tensors, axis=dim),
    "stack": lambda tensors, dim=0: jnp.stack(tensors, axis=dim),
    "flip": lambda x, dims: jnp.flip(x, tuple(dims)),
    "diagonal": lambda x, offset=0, dim1=0, dim2=1: jnp.diagonal(x, offset, dim1, dim2),
    "constant_pad_nd": _pad,
    "slice_scatter": _slice_scatter,
    "select_scatter": lambda x, src, dim, index: x.at[
        (slice(None),) * (dim % x.ndim) + (index,)
    ].set(src),
    "diagonal_scatter": _diagonal_scatter,
    "diag_embed": _diag_embed,
    "tril": lambda x, diagonal=0: jnp.tril(x, diagonal),
    "triu": lambda x, diagonal=0: jnp.triu(x, diagonal),
    "linalg_cholesky_ex": _cholesky_ex,
    "cholesky": lambda x, upper=False: _cholesky_ex(x, upper)[0],
    "linalg_solve_triangular": _solve_triangular,
    "triangular_solve": _triangular_solve,
    "eye": lambda n, m=None, dtype=None, **_: jnp.eye(n, m, dtype=_dtype(dtype)),
    "arange": _arange,
    "zeros": lambda size, dtype=None, **_: _full(size, 0, dtype),
    "ones": lambda size, dtype=None, **_: _full(size, 1, dtype),
    "full": _full,
    "scalar_tensor": lambda s, dtype=None, **_: jnp.asarray(s, _dtype(dtype)),
    "zeros_like": lambda x, dtype=None, **_: _like(x, 0, dtype),
    "ones_like": lambda x, dtype=None, **_: _like(x, 1, dtype),
    "full_like": _like,
    "empty_like": lambda x, dtype=None, **_: _like(x, 0, dtype),
    "new_zeros": lambda x, size, dtype=None, **_: jnp.zeros(tuple(size), _dtype(dtype, x.dtype)),
    "new_ones": lambda x, size, dtype=None, **_: jnp.ones(tuple(size), _dtype(dtype, x.dtype)),
    "fill": lambda x, value: jnp.full_like(x, value),
    "zero": jnp.zeros_like,
    "index_put": lambda x, indices, values, accumulate=False: (
        x.at[tuple(indices)].add(values) if accumulate else x.at[tuple(indices)].set(values)
    ),
    "index_add": lambda x, dim, index, source, alpha=1: x.at[
        (slice(None),) * (dim % x.ndim) + (index,)
    ].add(alpha * source),
    "_to_copy": _to_copy,
    "copy": lambda x, src, non_blocking=False: jnp.broadcast_to(src, x.shape).astype(x.dtype),
    "clone": _alias,
    "alias": _alias,
    "lift_fresh_copy": _alias,
    "detach": jax.lax.stop_gradient,
    # checks with no value (torch raises on bad input; JAX's results carry NaN instead)
    "_linalg_check_errors": lambda *_, **__: None,
    "_assert_async": lambda *_, **__: None,
}


def _op_name(target: Any) -> str | None:
    """``OPS``' key of an FX node's target: ``"name.overload"`` where that has its own entry
    (``"max.dim"``), else the op's name (``"add"`` for ``aten.add.Tensor``); ``None`` for
    ``operator.getitem``."""
    if target is operator.getitem:
        return None
    name = getattr(getattr(target, "overloadpacket", None), "__name__", str(target))
    overload = f"{name}.{getattr(target, '_overloadname', '')}"
    return overload if overload in OPS else name


def _constant(tensor: Any) -> jax.Array:
    return jnp.asarray(tensor.detach().cpu().numpy(), jax_dtype(tensor.dtype))


def lower_to_jax(fn: Callable, example: Any) -> Callable[[jax.Array], jax.Array]:
    """``fn`` (a torch function of one tensor shaped like ``example``) as a JAX function.

    Returns ``f(x) -> y`` with ``x`` of ``example``'s shape and dtype (:func:`jax_dtype`: a
    float64 function computes in float32 unless JAX's x64 mode is on), ``y`` what ``fn``
    returns (a JAX array, or a tuple of them). Raises :class:`LoweringError` when an op has no
    translation in :data:`OPS` (naming them all) or the recording fails. The result matches
    ``fn`` only where ``fn``'s Python control flow does not depend on ``x``'s values: check it
    (:func:`agrees_with_torch`).
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.node import map_arg

    try:
        graph_module = make_fx(torch.func.functionalize(fn, remove="mutations"))(example)
    except Exception as error:  # noqa: BLE001 - anything make_fx refuses cannot be lowered
        raise LoweringError(f"the function could not be recorded: {error}") from error
    graph_module.graph.eliminate_dead_code()
    nodes = list(graph_module.graph.nodes)
    calls = [n for n in nodes if n.op == "call_function"]
    missing = sorted({str(n.target) for n in calls if _op_name(n.target) not in (None, *OPS)})
    if missing or any(n.op in ("call_method", "call_module") for n in nodes):
        raise LoweringError(f"no JAX translation of {missing or 'a method or module call'}")
    in_dtype = jax_dtype(example.dtype)

    def call(node: Any, env: dict) -> Any:
        args = map_arg(node.args, env.__getitem__)
        kwargs = map_arg(node.kwargs, env.__getitem__)
        name = _op_name(node.target)
        return operator.getitem(*args) if name is None else OPS[name](*args, **kwargs)

    # Constant folding: what does not depend on the input is computed once, here, so that it
    # is concrete when traced (boolean masks index, shapes are static) and not recompiled.
    constants: dict = {}
    varying = {n for n in nodes if n.op == "placeholder"}
    try:
        for node in nodes:
            if node.op == "get_attr":
                constants[node] = _constant(getattr(graph_module, node.target))
            elif node.op == "call_function":
                if any(arg in varying for arg in node.all_input_nodes):
                    varying.add(node)
                else:
                    constants[node] = call(node, constants)
    except LoweringError:
        raise
    except Exception as error:  # noqa: BLE001 - a translation that does not fit the op's use
        raise LoweringError(f"the lowered graph does not evaluate in JAX: {error}") from error
    steps = [n for n in nodes if n in varying or n.op == "output"]

    def lowered(x: jax.Array) -> Any:
        env: dict = dict(constants)
        for node in steps:
            if node.op == "placeholder":
                env[node] = jnp.asarray(x, in_dtype)
            elif node.op == "call_function":
                env[node] = call(node, env)
            else:
                return map_arg(node.args[0], env.__getitem__)
        raise LoweringError("the recorded graph has no output")

    try:  # ops whose arguments the translation refuses (pos_weight, ...) fail here, once
        jax.eval_shape(lowered, jax.ShapeDtypeStruct(tuple(example.shape), in_dtype))
    except LoweringError:
        raise
    except Exception as error:  # noqa: BLE001 - a translation that does not fit the op's use
        raise LoweringError(f"the lowered graph does not trace in JAX: {error}") from error
    return lowered


def agrees_with_torch(lowered_vg: Callable, points: np.ndarray, reference: tuple) -> bool:
    """Whether ``lowered_vg(points) -> (values (n,), grads (n, d))`` matches ``reference``
    (torch's, as numpy) to the rounding of the dtype the lowered function computes in: relative
    1e-5 in float32 (1e-9 in float64) of each array's largest magnitude, non-finite where
    torch's is."""
    outputs = lowered_vg(points)
    rtol = 1e-9 if outputs[0].dtype == jnp.float64 else 1e-5
    for mine, theirs in zip(outputs, reference, strict=True):
        mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
        finite = np.isfinite(theirs)
        scale = max(1.0, float(np.max(np.abs(theirs[finite]), initial=0.0)))
        if not np.array_equal(np.isfinite(mine), finite):
            return False
        if not np.allclose(mine[finite], theirs[finite], rtol=rtol, atol=rtol * scale):
            return False
    return True


class LoweredLogDensity(eqx.Module):
    """A log density lowered to JAX (:func:`lower_to_jax`) as a function of a pytree position:
    ``self(position) = fn(ravel(position))``, a scalar in the position's dtype."""

    fn: Callable = eqx.field(static=True)
    unravel_fn: Callable = eqx.field(static=True)

    def __call__(self, position: Any) -> jax.Array:
        flat, _ = ravel_pytree(position)
        return jnp.asarray(self.fn(flat), flat.dtype)
