"""Tests of the model zoo: shapes, exact parameter counts, BatchNorm state, one real train step."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.masks import leaf_names, masked_leaves
from sparsejax.train.models import MODELS, ResNet, WideResNet, get_model

LENETS = ("lenet300100", "lenet5", "vit")  # the 28 × 28 models (the ViT included)
CIFAR = ("vgg16", "vgg16_quarter", "resnet56", "wrn16_8", "wrn28_8", "vit_tiny")
BATCH_NORM = ("vgg16", "vgg16_quarter", "resnet56", "wrn16_8", "wrn28_8")
KEY = jax.random.PRNGKey(0)


def input_spec(name: str, batch: int = 2) -> jax.ShapeDtypeStruct:
  shape = (batch, 28, 28, 1) if name in LENETS else (batch, 32, 32, 3)
  return jax.ShapeDtypeStruct(shape, jnp.float32)


@functools.cache
def abstract_variables(name: str, num_classes: int = 10):
  return jax.eval_shape(get_model(name, num_classes).init, KEY, input_spec(name))


def num_params(variables) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


# Parameter counts by hand: weights, biases and BatchNorm scale + bias per layer.
def conv(k: int, c_in: int, c_out: int) -> int:
  return k * k * c_in * c_out


def bn(c: int) -> int:
  return 2 * c


def dense(n_in: int, n_out: int, bias: bool = True) -> int:
  return n_in * n_out + (n_out if bias else 0)


def vit_count(num_classes: int, patch=7, width=64, depth=4, mlp=128, tokens=17) -> int:
  attention = 4 * dense(width, width)  # query, key, value, out (biases [heads, head_dim] or [d])
  block = 2 * bn(width) + attention + dense(width, mlp) + dense(mlp, width)  # two LayerNorms
  return (conv(patch, 1, width) + width + width + tokens * width + depth * block + bn(width)
          + dense(width, num_classes))


def vit_tiny_count(num_classes: int, patch_dim=48, width=512, depth=4, inner=6 * 64,
                   mlp=256) -> int:
  attention = bn(width) + dense(width, 3 * inner, bias=False) + dense(inner, width, bias=False)
  mlp_block = bn(width) + dense(width, mlp) + dense(mlp, width)  # bn(): LayerNorm scale + bias
  return (bn(patch_dim) + dense(patch_dim, width) + bn(width) + depth * (attention + mlp_block)
          + bn(width) + dense(width, num_classes))  # no parameter for the position embedding


def vgg_count(widths, head, head_bn: bool, num_classes: int) -> int:
  total = sum(conv(3, a, b) + bn(b) for a, b in zip((3, *widths), widths))
  for a, b in zip((widths[-1], *head), head):
    total += dense(a, b, bias=not head_bn) + (bn(b) if head_bn else 0)
  return total + dense(head[-1], num_classes)


def resnet_count(depth: int, num_classes: int) -> int:
  n = (depth - 2) // 6
  total = conv(3, 3, 16) + bn(16)
  for c_in, c in [(16, 16), (16, 32), (32, 64)]:
    total += conv(3, c_in, c) + conv(3, c, c) + 2 * bn(c)   # option A: no shortcut weights
    total += (n - 1) * (2 * conv(3, c, c) + 2 * bn(c))
  return total + dense(64, num_classes)


def wrn_count(depth: int, k: int, num_classes: int) -> int:
  n = (depth - 4) // 6
  total = conv(3, 3, 16)
  for c_in, c in [(16, 16 * k), (16 * k, 32 * k), (32 * k, 64 * k)]:
    total += bn(c_in) + conv(3, c_in, c) + bn(c) + conv(3, c, c) + conv(1, c_in, c)
    total += (n - 1) * (2 * bn(c) + 2 * conv(3, c, c))
  return total + bn(64 * k) + dense(64 * k, num_classes)


VGG16 = (64, 64, 128, 128, 256, 256, 256) + (512,) * 6
EXPECTED = {
    "lenet300100": lambda nc: dense(784, 300) + dense(300, 100) + dense(100, nc),
    "lenet5": lambda nc: (conv(5, 1, 20) + 20 + conv(5, 20, 50) + 50 + dense(800, 500)
                          + dense(500, nc)),
    "vit": vit_count,
    "vgg16": lambda nc: vgg_count(VGG16, (512,), True, nc),
    "vgg16_quarter": lambda nc: vgg_count(tuple(w // 4 for w in VGG16), (512, 512), False, nc),
    "resnet56": lambda nc: resnet_count(56, nc),
    "wrn16_8": lambda nc: wrn_count(16, 8, nc),
    "wrn28_8": lambda nc: wrn_count(28, 8, nc),
    "vit_tiny": vit_tiny_count,
}
EXPECTED_10_CLASSES = {"lenet300100": 266_610, "lenet5": 431_080, "vit": 139_018,
                       "vgg16": 14_987_210,
                       "vgg16_quarter": 1_255_674, "resnet56": 853_018, "wrn16_8": 10_961_370,
                       "wrn28_8": 23_354_842, "vit_tiny": 4_237_930}


ALWAYS_SPARSE = {"sparse_mlp": (1024, 1024), "wide_sparse_mlp": (32768, 32768)}


def test_every_model_is_covered():
  assert set(MODELS) == set(LENETS + CIFAR + tuple(ALWAYS_SPARSE))
  assert set(LENETS + CIFAR) == set(EXPECTED) == set(EXPECTED_10_CLASSES)


@pytest.mark.parametrize("name", sorted(ALWAYS_SPARSE))
def test_always_sparse_mlps_hold_exactly_their_er_connections(name):
  """Every layer sparse with ER's exact counts; the params are the values, the three
  probes (γ = 1 candidates per connection, fan_in + fan_out statistics) and the biases."""
  from sparsejax import distributions
  import sparsejax.nn as sjnn

  model = get_model(name, 10, {"sparsity": 0.99, "distribution": "er"})
  variables = jax.eval_shape(model.init, KEY, input_spec("lenet300100"))
  sizes = (784, *ALWAYS_SPARSE[name], 10)
  shapes = list(zip(sizes[:-1], sizes[1:]))
  counts = distributions.allocate_nnz(shapes, 0.99, "er")
  summary = sjnn.summary(variables["params"])
  assert [layer["nnz"] for layer in summary["layers"].values()] == counts
  assert summary["size"] == sum(a * b for a, b in shapes)
  total = sum(2 * n + a + b + b for n, (a, b) in zip(counts, shapes))
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == total
  assert "kernel" not in str(jax.tree_util.tree_structure(variables["params"]))


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", LENETS + CIFAR)
def test_output_shapes(name, num_classes):
  model = get_model(name, num_classes)
  x = input_spec(name, batch=3)
  variables = abstract_variables(name, num_classes)
  chex.assert_shape(jax.eval_shape(model.apply, variables, x), (3, num_classes))
  chex.assert_shape(jax.eval_shape(functools.partial(model.apply, train=False), variables, x),
                    (3, num_classes))
  if name in BATCH_NORM:
    logits, state = jax.eval_shape(
        functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, x)
    chex.assert_shape(logits, (3, num_classes))
    chex.assert_trees_all_equal_shapes_and_dtypes(state["batch_stats"], variables["batch_stats"])


@pytest.mark.parametrize("name", LENETS + CIFAR)
def test_param_counts(name):
  assert EXPECTED[name](10) == EXPECTED_10_CLASSES[name]
  for num_classes in (10, 100):
    assert num_params(abstract_variables(name, num_classes)) == EXPECTED[name](num_classes)


@pytest.mark.parametrize("name", LENETS + CIFAR)
def test_kernels_are_masked_leaves_and_batch_stats_exist_with_batch_norm(name):
  variables = abstract_variables(name)
  masked = masked_leaves(variables["params"])
  for (path, leaf), flag in zip(jax.tree_util.tree_leaves_with_path(variables["params"]),
                                jax.tree.leaves(masked)):
    is_kernel = path[-1].key == "kernel"
    assert flag == is_kernel, (path, leaf.shape)
    if name != "vit":  # the ViT has 2-D attention biases and positional embeddings
      assert leaf.ndim in ((2, 4) if is_kernel else (1,))
  bn_modules = {path[:-1] for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
                if path[-1].key == "scale"}
  if name not in BATCH_NORM:  # LayerNorms only in the ViTs
    assert set(variables) == {"params"} and (not bn_modules or name in ("vit", "vit_tiny"))
  else:
    assert set(variables) == {"params", "batch_stats"}
    stats = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
    assert {path[:-1] for path, _ in stats} == bn_modules
    assert len(stats) == 2 * len(bn_modules)


def kernel_shapes(name: str) -> dict[str, tuple[int, ...]]:
  """Kernel shape of each top-level layer, by name ("Conv_0", "Dense_1", ...)."""
  params = abstract_variables(name)["params"]
  return {layer: p["kernel"].shape for layer, p in params.items() if "kernel" in p}


def test_layer_shapes():
  assert kernel_shapes("lenet300100") == {"Dense_0": (784, 300), "Dense_1": (300, 100),
                                          "Dense_2": (100, 10)}
  assert kernel_shapes("lenet5") == {"Conv_0": (5, 5, 1, 20), "Conv_1": (5, 5, 20, 50),
                                     "Dense_0": (800, 500), "Dense_1": (500, 10)}
  widths = (16, 16, 32, 32, 64, 64, 64) + (128,) * 6
  convs = {f"Conv_{i}": (3, 3, a, b) for i, (a, b) in enumerate(zip((3, *widths), widths))}
  assert kernel_shapes("vgg16_quarter") == {
      **convs, "Dense_0": (128, 512), "Dense_1": (512, 512), "Dense_2": (512, 10)}
  vgg16 = kernel_shapes("vgg16")
  assert vgg16["Conv_0"] == (3, 3, 3, 64) and vgg16["Conv_12"] == (3, 3, 512, 512)
  assert vgg16["Dense_0"] == (512, 512) and vgg16["Dense_1"] == (512, 10)
  wrn = abstract_variables("wrn16_8")["params"]
  shortcuts = [wrn[f"_WideBlock_{i}"]["shortcut"]["kernel"].shape for i in range(0, 6, 2)]
  assert shortcuts == [(1, 1, 16, 128), (1, 1, 128, 256), (1, 1, 256, 512)]
  assert "shortcut" not in wrn["_WideBlock_1"]


def test_vit_tiny_masks_its_18_dense_kernels_and_has_a_fixed_position_embedding():
  params = abstract_variables("vit_tiny")["params"]
  masked = {name for name, flag in zip(leaf_names(params), jax.tree.leaves(masked_leaves(params)))
            if flag}
  layers = ("to_qkv", "to_out", "mlp_in", "mlp_out")
  assert masked == {"patch_embedding/kernel", "head/kernel"} | {
      f"block_{i}/{layer}/kernel" for i in range(4) for layer in layers}
  assert len(masked) == 18  # biases and LayerNorms stay dense
  block = params["block_0"]
  assert (block["to_qkv"]["kernel"].shape, block["to_out"]["kernel"].shape) == ((512, 1152),
                                                                               (384, 512))
  assert set(block["to_qkv"]) == set(block["to_out"]) == {"kernel"}  # no biases
  assert params["patch_embedding"]["kernel"].shape == (48, 512)
  # Without a position embedding, mean pooling would make the logits invariant to swapping
  # two 4 × 4 patches; the embedding is a constant (no variable holds it).
  x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
  swapped = x.copy()
  swapped[:, :4, :4], swapped[:, 4:8, 8:12] = x[:, 4:8, 8:12], x[:, :4, :4]
  variables = numpy_variables(abstract_variables("vit_tiny"))
  assert set(variables) == {"params"}
  logits = jax.jit(get_model("vit_tiny").apply)(variables, np.concatenate([x, swapped]))
  assert np.all(np.isfinite(logits)) and not np.allclose(logits[0], logits[1], atol=1e-4)


def test_bad_depths_raise():
  x = input_spec("resnet56")
  with pytest.raises(ValueError, match="6n \\+ 2"):
    jax.eval_shape(ResNet(depth=21).init, KEY, x)
  with pytest.raises(ValueError, match="6n \\+ 4"):
    jax.eval_shape(WideResNet(depth=17).init, KEY, x)


def test_unknown_model():
  with pytest.raises(ValueError, match="unknown model 'resnet'.*'wrn28_8'"):
    get_model("resnet")


def numpy_variables(abstract, seed: int = 0):
  """He-normal kernels, unit BN scales and variances, zero biases and means.

  Made with numpy: XLA:CPU takes seconds to compile a real ``init`` of a 13-conv network.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)
    return np.full(leaf.shape, float(path[-1].key in ("scale", "var")), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def test_train_step_updates_batch_stats_only_in_train_mode():
  model = get_model("vgg16_quarter")
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  y = np.array([3, 7])
  variables = numpy_variables(abstract_variables("vgg16_quarter"))
  stats = variables["batch_stats"]

  @jax.jit  # one compilation for the train step and the eval forward pass
  def step(variables):
    def loss(params):
      logits, new = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    (value, new), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    logits, same = model.apply(variables, x, train=False, mutable=["batch_stats"])
    return value, grads, new["batch_stats"], logits, same["batch_stats"]

  value, grads, new_stats, logits, eval_stats = step(variables)
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), path
  for old_leaf, new_leaf in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats)):
    assert not np.allclose(old_leaf, new_leaf)
  chex.assert_shape(logits, (2, 10))
  chex.assert_trees_all_equal(eval_stats, stats)
