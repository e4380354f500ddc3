"""Sparse products of the always-sparse layers: no [fan_in, fan_out] array is ever formed.

A layer's weights are ``nnz`` (input, output, value) triples in any order. Every
product walks them in chunks of :data:`CHUNK` connections with a ``fori_loop``: a
chunk gathers the rows of xᵀ it reads (``[chunk, batch]``), scales them by its
values and scatter-adds them into the rows of yᵀ it writes. Working on the
transposed activations keeps every gather and scatter on contiguous rows of
``batch`` floats, and the chunk bounds the temporaries, so memory is
O(nnz + batch · (fan_in + fan_out)) and time O(batch · nnz).

Measured on this project's 2-core CPU (8192 × 8192, batch 128, forward and both
backward products ÷ the dense layer's): chunks of 4,096 take 0.13–0.27× at 99 %
sparsity and 0.03× at 99.9 %; one gather of all connections at once (the
``[nnz, batch]`` block) or ``jax.experimental.sparse`` take 1.2–4.3× at 99 %.
The order of the connections changes the speed (the lower bound above is sorted,
the upper random; the layers walk them in
:func:`sparsejax.nn.connections.connection_order`), not the result beyond float
summation order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from sparsejax import sampling

CHUNK = 4096  # connections per loop iteration


def _in_chunks(chunk: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Pads 1-D arrays with zeros to a multiple of ``chunk`` and reshapes to [chunks, chunk].

  A padded connection is (input 0, output 0, value 0): it adds 0 to every product.
  """
  size = arrays[0].shape[0]
  padding = (-size) % chunk
  return tuple(jnp.pad(a, (0, padding)).reshape(-1, chunk) for a in arrays)


def _chunk_size(nnz: int) -> int:
  return max(1, min(CHUNK, nnz))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _product_t(x_t: jax.Array, values: jax.Array, rows: jax.Array, cols: jax.Array,
               fan_out: int) -> jax.Array:
  """yᵀ = Wᵀ xᵀ for W given as triples; ``x_t`` is [fan_in, batch], the result [fan_out, batch]."""
  chunk = _chunk_size(values.shape[0])
  r, c, v = _in_chunks(chunk, rows, cols, values)

  def body(i, y_t):
    return y_t.at[c[i]].add(x_t[r[i]] * v[i][:, None].astype(x_t.dtype))

  return jax.lax.fori_loop(0, r.shape[0], body, jnp.zeros((fan_out, x_t.shape[1]), x_t.dtype))


def _product_t_fwd(x_t, values, rows, cols, fan_out):
  return _product_t(x_t, values, rows, cols, fan_out), (x_t, values, rows, cols)


def _product_t_bwd(fan_out, residuals, dy_t):
  del fan_out
  x_t, values, rows, cols = residuals
  chunk = _chunk_size(values.shape[0])
  r, c, v = _in_chunks(chunk, rows, cols, values)

  def body(i, carry):
    dx_t, dv = carry
    grad_out = dy_t[c[i]]  # [chunk, batch]
    dv = dv.at[i].set((x_t[r[i]] * grad_out).sum(1).astype(dv.dtype))
    dx_t = dx_t.at[r[i]].add(grad_out * v[i][:, None].astype(dy_t.dtype))
    return dx_t, dv

  dx_t, dv = jax.lax.fori_loop(0, r.shape[0], body,
                               (jnp.zeros_like(x_t), jnp.zeros(r.shape, values.dtype)))
  return dx_t, dv.reshape(-1)[:values.shape[0]], None, None


_product_t.defvjp(_product_t_fwd, _product_t_bwd)


def sparse_matmul(x: jax.Array, values: jax.Array, rows: jax.Array, cols: jax.Array,
                  fan_out: int) -> jax.Array:
  """``x @ W`` for the sparse W with ``W[rows[i], cols[i]] = values[i]``.

  Differentiable in ``x`` and ``values`` (a custom VJP runs both backward products
  in one chunked pass); ``rows`` and ``cols`` are never differentiated. A pair listed
  twice adds its values, as a sum of triples does.

  Args:
    x: inputs ``[..., fan_in]``.
    values: the connections' weights, ``[nnz]``.
    rows: int32 input index of each connection, ``[nnz]``.
    cols: int32 output index of each connection, ``[nnz]``.
    fan_out: number of outputs (static).

  Returns:
    ``[..., fan_out]`` in ``x``'s dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sparsejax.nn import kernels
    >>> x = jnp.array([[1.0, 2.0, 3.0]])
    >>> kernels.sparse_matmul(x, jnp.array([10.0, 1.0]), jnp.array([0, 2]),
    ...                       jnp.array([1, 1]), fan_out=2)
    Array([[ 0., 13.]], dtype=float32)
  """
  lead, fan_in = x.shape[:-1], x.shape[-1]
  x_t = x.reshape(math.prod(lead), fan_in).T
  return _product_t(x_t, values, rows, cols, fan_out).T.reshape(*lead, fan_out)


def pair_gradients(inputs: jax.Array, output_grads: jax.Array, rows: jax.Array,
                   cols: jax.Array) -> jax.Array:
  """∂L/∂W at the listed pairs: ``Σ_rows inputs[:, rows[i]] · output_grads[:, cols[i]]``.

  O(rows · pairs) time, no [fan_in, fan_out] array.

  Args:
    inputs: the layer's inputs h, ``[rows, fan_in]``.
    output_grads: the loss gradient at its outputs δ, ``[rows, fan_out]``.
    rows: int32 input indices, ``[pairs]``.
    cols: int32 output indices, ``[pairs]``.

  Returns:
    float32 ``[pairs]``.
  """
  if rows.shape[0] == 0:
    return jnp.zeros((0,), jnp.float32)
  h_t, delta_t = inputs.T, output_grads.T
  r, c = _in_chunks(_chunk_size(rows.shape[0]), rows, cols)

  def one_chunk(i):
    return (h_t[r[i]].astype(jnp.float32) * delta_t[c[i]].astype(jnp.float32)).sum(1)

  return jax.lax.map(one_chunk, jnp.arange(r.shape[0])).reshape(-1)[:rows.shape[0]]


OBSERVE_NONE, OBSERVE_GRABO, OBSERVE_GRAEST = 0, 1, 2


@jax.custom_vjp
def growth_probe(outputs: jax.Array, inputs: jax.Array, candidates: jax.Array,
                 statistics: jax.Array, candidate_rows: jax.Array, candidate_cols: jax.Array,
                 grow: jax.Array, observe: jax.Array, key: jax.Array) -> jax.Array:
  """The identity on a layer's ``outputs``, whose backward reports what growth needs.

  ``candidates`` and ``statistics`` are zero-valued parameters that do not change
  the outputs; their gradients are defined as:

  - ``candidates`` ``[m]``: when ``grow``, the exact gradient of the loss with
    respect to the weight of each (``candidate_rows[i]``, ``candidate_cols[i]``)
    connection at value 0, Σ_rows h_a δ_b (:func:`pair_gradients`); else 0.
  - ``statistics`` ``[fan_in + fan_out]``: the sampling statistics f ‖ g of this
    batch, GraBo's (``observe == 1``) or GraEst's with random signs from ``key``
    (``observe == 2``); else 0.

  So they reach the optimizer with the ordinary gradients, from ``jax.grad`` of an
  unchanged loss. ``outputs`` is ``[rows, fan_out]`` and ``inputs`` ``[rows, fan_in]``.
  """
  del inputs, candidates, statistics, candidate_rows, candidate_cols, grow, observe, key
  return outputs


def _probe_fwd(outputs, inputs, candidates, statistics, candidate_rows, candidate_cols, grow,
               observe, key):
  residuals = (inputs, candidates, statistics, candidate_rows, candidate_cols, grow, observe, key)
  return outputs, residuals


def _probe_bwd(residuals, output_grads):
  inputs, candidates, statistics, candidate_rows, candidate_cols, grow, observe, key = residuals
  candidate_grads = jax.lax.cond(
      grow, lambda: pair_gradients(inputs, output_grads, candidate_rows, candidate_cols),
      lambda: jnp.zeros((candidate_rows.shape[0],), jnp.float32))

  def grabo():
    return jnp.concatenate(sampling.grabo(inputs, output_grads))

  def graest():
    signs = sampling.random_signs(key, inputs.shape[0])
    return jnp.concatenate(sampling.graest(inputs, output_grads, signs))

  def nothing():
    return jnp.zeros(statistics.shape, jnp.float32)

  observed = jax.lax.switch(observe, [nothing, grabo, graest])
  return (output_grads, jnp.zeros_like(inputs), candidate_grads.astype(candidates.dtype),
          observed.astype(statistics.dtype), None, None, None, None, None)


growth_probe.defvjp(_probe_fwd, _probe_bwd)
