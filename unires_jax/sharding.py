"""The device mesh and the logical-axis → mesh-axis rules; the one place parallelism is decided.

Every parameter carries logical axis names (`'embed'`, `'mlp'`, `'heads'`, ...) and key activations carry
`'activation_*'` names. `config.sharding_rules` maps them to the mesh axes `('data', 'fsdp', 'tensor')`.
Changing the parallelism is editing that table, never the model.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: batch over data×fsdp, weights' embed dim over fsdp (ZeRO-3 style), Megatron-style tensor
# parallelism over heads / mlp / vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("conv_spatial", None),
)

log = logging.getLogger(__name__)


def batch_axes(rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
  """The mesh axes a batch dimension is split over: the rules' `activation_batch` entry."""
  found = [target for name, target in rules if name == "activation_batch"]
  if not found:
    raise ValueError("sharding rules: no 'activation_batch' entry (the mesh axes the batch is split over)")
  target = found[0]
  return () if target is None else tuple(target) if isinstance(target, (tuple, list)) else (target,)


# The axes input batches are split over (`to_global_batch`, `batch_shardings`): the default rules' entry.
BATCH_AXES = batch_axes(DEFAULT_RULES)


def check_batch_rule(rules: Sequence[tuple[str, Any]]) -> None:
  """Input batches are placed over `BATCH_AXES`; a config whose `activation_batch` rule differs is refused."""
  if batch_axes(rules) != BATCH_AXES:
    raise ValueError(f"sharding_rules: activation_batch -> {batch_axes(rules)}, but input batches are split over "
                     f"{BATCH_AXES} (the default rules' entry); keep activation_batch at {BATCH_AXES}")


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a `('data', 'fsdp', 'tensor')` mesh; one axis may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh config {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh config {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  if unknown:
    if len(devices) % known:
      raise ValueError(f"mesh config {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not divisible "
                       f"by the fixed axes' product {known}")
    sizes[unknown[0]] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh config {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available")
  device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Normalises a config's rule list (lists from ConfigDict) into the tuple form Flax expects."""
  out = []
  for entry in rules:
    name, target = entry
    if isinstance(target, list):
      target = tuple(target)
    out.append((str(name), target))
  return tuple(out)


def batch_size_per_data_shard(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_fits_mesh(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
  shards = batch_size_per_data_shard(mesh)
  if global_batch_size % shards:
    raise ValueError(f"{what} {global_batch_size} does not divide evenly over the mesh's batch axes "
                     f"{BATCH_AXES} = {shards} shards (mesh {dict(mesh.shape)})")


def _fit_spec_to_shape(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (such dims stay replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_tuple = axes if isinstance(axes, tuple) else (axes,)
    kept = tuple(a for a in axes_tuple if dim % mesh.shape[a] == 0)
    # Keep the longest prefix whose product divides the dim.
    while kept and dim % math.prod(mesh.shape[a] for a in kept):
      kept = kept[:-1]
    fitted.append(None if not kept else (kept if len(kept) > 1 else kept[0]))
  return P(*fitted)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """Shardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays.

  Dimensions a mesh axis does not divide (e.g. 2 KV heads over 4 tensor shards) are replicated instead of
  failing; they are logged once, so an unexpected replication is visible.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  unboxed = nn.meta.unbox(abstract_tree)
  replicated = []

  def to_sharding(path, spec, leaf):
    if leaf is None:
      return None
    if not isinstance(spec, P):
      spec = P()
    fitted = _fit_spec_to_shape(spec, tuple(leaf.shape), mesh)
    if fitted != spec and any(a is not None for a in spec):
      replicated.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: {spec} -> {fitted}")
    return NamedSharding(mesh, fitted)

  shardings = jax.tree_util.tree_map_with_path(
      to_sharding, mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P) or x is None)
  if replicated:
    log.info("sharding: %d tensors have dims the mesh does not divide, kept replicated there:\n  %s",
             len(replicated), "\n  ".join(replicated[:20]))
  return shardings


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside a mesh / rules context."""
  return nn.with_logical_constraint(x, tuple(logical_axes))


class LogicalParam(nn.LogicallyPartitioned):
  """A logically-partitioned parameter box whose unboxing never adds a sharding constraint.

  Flax re-runs parameter initialisers under `jax.eval_shape` during `apply` to check shapes; `DenseGeneral`
  unboxes its flat kernel before reshaping it, which under a mesh would constrain a rank-2 array with rank-3
  names. Parameter shardings come from `out_shardings` at init instead, so the constraint is not needed.
  """

  def unbox(self, apply_constraint=True):
    del apply_constraint
    return self.value


def logical_init(init_fn, names):
  """`nn.with_logical_partitioning` with the `LogicalParam` box."""
  def wrapped(*args, **kwargs):
    return LogicalParam(init_fn(*args, **kwargs), tuple(names))
  return wrapped
