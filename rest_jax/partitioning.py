"""Device mesh, T5X logical axis rules, sharded train state and batches, multi-host start-up.

One code path serves 1 CPU, 8 simulated devices and a TPU pod: the model names the axes of its
parameters and activations logically ('batch', 'embed', 'mlp', 'heads', ...), the rules below map
those names onto a ('data', 'model') mesh, and `jax.jit` with explicit shardings does the rest
(GSPMD). ReST's Grow and Improve steps (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) both run
through these helpers: sampling is sharded along the batch, training along batch and model.

Typical use::

    initialize_multihost()                       # before anything touches jax devices
    part = Partitioner.create()                  # gin: create_mesh.mesh_shape = (-1, 2), T5X's rule knobs
    state, state_shardings = part.init(init_fn, rng)
    step = part.partition(train_step, out_shardings=(state_shardings, part.replicated))
    state, metrics = step(state, part.shard_batch(host_batch))

Only `jax.jit` with shardings and `jax.set_mesh` are used (no `pjit`, no `with mesh:`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from flax.core import meta
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rest_jax import tree as tree_lib

logger = logging.getLogger(__name__)

PyTree = Any
MeshAxes = str | tuple[str, ...] | None
LogicalRules = Sequence[tuple[str, MeshAxes]]

# Where `rest_jax launch` (rest_jax.launch) tells each local process the coordinator and its place.
COORDINATOR_ENV = "REST_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "REST_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "REST_JAX_PROCESS_ID"

# Environment variables that announce a multi-process launch (JAX's own, Cloud TPU pods and
# multislice, SLURM, Open MPI). Their presence is what `initialize_multihost(mode='auto')` reads.
_MULTIPROCESS_ENV = {
    "JAX_COORDINATOR_ADDRESS": 0,
    "MEGASCALE_COORDINATOR_ADDRESS": 0,
    "TPU_WORKER_HOSTNAMES": 2,  # comma-separated host list: multi-host only with 2+ entries
    "TPU_PROCESS_ADDRESSES": 2,
    "SLURM_NTASKS": 2,  # integer count: multi-process only when >= 2
    "OMPI_COMM_WORLD_SIZE": 2,
}


# --------------------------------------------------------------------------------------------
# Multi-host start-up.
# --------------------------------------------------------------------------------------------


def _multiprocess_env_detected() -> str | None:
    """Names the environment variable that shows a multi-process launch, or None."""
    for name, min_count in _MULTIPROCESS_ENV.items():
        value = os.environ.get(name)
        if not value:
            continue
        if min_count == 0:
            return name
        if name.endswith(("HOSTNAMES", "ADDRESSES")):
            count = len([h for h in value.split(",") if h.strip()])
        else:
            try:
                count = int(value)
            except ValueError:
                continue
        if count >= min_count:
            return name
    return None


def _launcher_settings() -> dict[str, Any]:
    """Coordinator, process count and index set by `rest_jax launch` (rest_jax.launch), or {}."""
    address = os.environ.get(COORDINATOR_ENV)
    if not address:
        return {}
    try:
        return {"coordinator_address": address, "num_processes": int(os.environ[NUM_PROCESSES_ENV]),
                "process_id": int(os.environ[PROCESS_ID_ENV])}
    except (KeyError, ValueError) as e:
        raise ValueError(f"{COORDINATOR_ENV} is set, but {NUM_PROCESSES_ENV} / {PROCESS_ID_ENV} are missing "
                         f"or not integers ({e}).") from e


class CoordinatorUnreachableError(ConnectionError):
    """The jax.distributed coordinator (process 0) did not answer within the start-up timeout."""


def _wait_for_coordinator(address: str, timeout_s: float, who: str) -> None:
    """Returns once something listens on `address` ('host:port'); raises after `timeout_s` seconds."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachableError(
                    f"{who} could not reach the jax.distributed coordinator at {address} within "
                    f"initialize_multihost.initialization_timeout_s={timeout_s:g} s ({e}). Process 0 starts "
                    "it: check that process 0 is running and that this address and port are reachable.") from e
            time.sleep(0.5)


@gin.configurable
def initialize_multihost(mode: str = "auto", coordinator_address: str | None = None,
                         num_processes: int | None = None, process_id: int | None = None,
                         local_device_ids: Sequence[int] | None = None,
                         initialization_timeout_s: int = 120, heartbeat_timeout_s: int = 60) -> bool:
    """Starts `jax.distributed` when this program is one process of a multi-process job.

    Must run before anything initialises the jax backend (`jax.devices()`, array creation). Every
    process of the job (every host of a pod) calls it with the same settings.

    Args:
      mode: 'auto' initialises when a coordinator address is given or the environment shows a
        multi-process launch (`rest_jax launch`, JAX_COORDINATOR_ADDRESS, TPU pod / multislice host
        lists, SLURM or Open MPI with 2+ tasks), and is a no-op otherwise (one CPU, one host);
        'always' initialises unconditionally, letting jax detect the cluster (e.g. a Cloud TPU VM pod
        whose topology is only in the metadata server); 'never' skips it.
      coordinator_address: 'host:port' of process 0; None: from `rest_jax launch`, else jax detects it.
      num_processes: Number of processes; None: as for the address.
      process_id: This process's index; None: as for the address.
      local_device_ids: Devices this process drives; None means all visible ones.
      initialization_timeout_s: How long a process waits for the coordinator and the other processes
        to join before failing with the address it tried.
      heartbeat_timeout_s: How long after a process stops answering (killed, preempted host) the
        others are told and exit, instead of waiting forever in a collective.

    Returns:
      True when `jax.distributed` is initialised after the call.
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"initialize_multihost.mode must be 'auto', 'always' or 'never', got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    if mode == "never":
        return False
    launched = _launcher_settings()
    settings = {"coordinator_address": coordinator_address or launched.get("coordinator_address"),
                "num_processes": num_processes if num_processes is not None else launched.get("num_processes"),
                "process_id": process_id if process_id is not None else launched.get("process_id")}
    reason = "mode='always'" if mode == "always" else (
        "rest_jax launch" if launched and not coordinator_address else
        "coordinator_address" if coordinator_address else _multiprocess_env_detected())
    if reason is None:
        logger.info("initialize_multihost: single-process run, jax.distributed not started.")
        return False
    logger.info("initialize_multihost: starting jax.distributed (%s).", reason)
    # Cross-process collectives on the CPU backend (the local stand-in for a pod) need an
    # implementation; TPU and GPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings["coordinator_address"] and settings["process_id"] not in (None, 0):
        # jax aborts the whole process (a native check failure, no Python error) when the coordinator
        # cannot be reached; look first, so that the message names the address and the knob.
        _wait_for_coordinator(settings["coordinator_address"], initialization_timeout_s,
                              f"process {settings['process_id']} of {settings['num_processes']}")
    jax.distributed.initialize(local_device_ids=local_device_ids,
                               initialization_timeout=int(initialization_timeout_s),
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s), **settings)
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices.",
                jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_chief() -> bool:
    """True on process 0, the one that writes what every process agrees on (metadata, reports, plots)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process job reaches the barrier `name`; a no-op in one process.

    For files one process writes and the others then read (a vocabulary, a Grow store's metadata).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        multihost_utils.sync_global_devices(name)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in process order (`[obj]` in one process).

    For host results of different sizes (decoded texts and tokens); every process must call it.
    """
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    stacked = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(stacked[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


# --------------------------------------------------------------------------------------------
# Mesh.
# --------------------------------------------------------------------------------------------


def _resolve_shape(shape: Sequence[int], num_devices: int, what: str) -> tuple[int, ...]:
    """Replaces a single -1 in `shape` by whatever makes the product equal `num_devices`."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{what}={shape}: sizes must be positive, with at most one -1 (fill).")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"{what}={shape}: {num_devices} devices are not divisible by {known}.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"{what}={shape} needs {math.prod(shape)} devices, but {num_devices} are "
                         "available; use -1 for the axis that should take the rest.")
    return shape


@gin.configurable
def create_mesh(mesh_shape: Sequence[int] = (-1, 1), axis_names: Sequence[str] = ("data", "model"),
                num_partitions: int | None = None, dcn_mesh_shape: Sequence[int] | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the device mesh, laid out for the interconnect (ICI within a slice, DCN across).

    Axes are `AxisType.Auto` so that flax's logical sharding constraints steer GSPMD, as in T5X.

    Args:
      mesh_shape: Size of each axis within a slice; one -1 takes the remaining devices. The
        default (-1, 1) is pure data parallelism.
      axis_names: Mesh axis names; the logical axis rules refer to them.
      num_partitions: T5X's knob: when set, overrides `mesh_shape` with (-1, num_partitions),
        i.e. that many model-parallel partitions.
      dcn_mesh_shape: For multislice TPU jobs, the number of slices along each axis (e.g. (2, 1)
        for data parallelism across 2 slices); `mesh_shape` is then the per-slice shape.
      devices: Devices to use; all global devices by default.

    Returns:
      A `jax.sharding.Mesh`.
    """
    if num_partitions is not None:
        mesh_shape = (-1, int(num_partitions))
    if len(mesh_shape) != len(axis_names):
        raise ValueError(f"create_mesh: mesh_shape={tuple(mesh_shape)} and axis_names={tuple(axis_names)} "
                         "differ in length.")
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(axis_names)
    if dcn_mesh_shape is None:
        shape = _resolve_shape(mesh_shape, len(devices), "create_mesh.mesh_shape")
        return jax.make_mesh(shape, tuple(axis_names), axis_types=axis_types, devices=devices)
    if len(dcn_mesh_shape) != len(axis_names):
        raise ValueError(f"create_mesh: dcn_mesh_shape={tuple(dcn_mesh_shape)} and "
                         f"axis_names={tuple(axis_names)} differ in length.")
    num_slices = math.prod(dcn_mesh_shape)
    if len(devices) % num_slices:
        raise ValueError(f"create_mesh: {len(devices)} devices do not split into {num_slices} slices.")
    ici_shape = _resolve_shape(mesh_shape, len(devices) // num_slices, "create_mesh.mesh_shape")
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, tuple(dcn_mesh_shape), devices)
    return Mesh(device_array, tuple(axis_names), axis_types=axis_types)


# --------------------------------------------------------------------------------------------
# Logical axis rules.
# --------------------------------------------------------------------------------------------


@gin.configurable
def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: LogicalRules | None = None) -> tuple[tuple[str, MeshAxes], ...]:
    """T5X's standard logical-axis-to-mesh rules, with T5X's gin knobs and semantics.

    The rules are priority-ordered: a logical axis takes the first rule whose mesh axis is still
    free in that array. With 1-D partitioning (the default) parameters and activations are split
    along 'model' by vocab / mlp / heads / joined_kv and batches along 'data'. 2-D activation
    partitioning also splits 'embed' activations along 'model'; 2-D parameter partitioning splits
    the parameters' 'embed' dimension along 'data' (ZeRO-3-like; activations keep 'data' for batch).

    Args:
      activation_partitioning_dims: 1 or 2.
      parameter_partitioning_dims: 1 or 2.
      additional_rules: Rules appended after the standard ones (lowest priority), e.g.
        (('cache_batch', 'data'),).

    Returns:
      A tuple of (logical axis name, mesh axis or None) pairs.
    """
    head = [("batch", "data"), ("vocab", "model")]
    model_parallel = [("mlp", "model"), ("heads", "model"), ("kv", None), ("joined_kv", "model")]
    dims = (activation_partitioning_dims, parameter_partitioning_dims)
    if dims == (1, 1):
        rules = head + [("embed", None)] + model_parallel
    elif dims == (2, 1):
        rules = head + model_parallel + [("embed", "model")]
    elif dims == (1, 2):
        rules = head + model_parallel + [("embed", "data")]
    elif dims == (2, 2):
        rules = head + model_parallel + [("embed", "model"), ("embed", "data")]
    else:
        raise ValueError(f"standard_logical_axis_rules: activation_partitioning_dims="
                         f"{activation_partitioning_dims}, parameter_partitioning_dims="
                         f"{parameter_partitioning_dims} is not supported (each must be 1 or 2).")
    # Axes T5X always replicates.
    rules += [("relpos_buckets", None), ("abspos_buckets", None), ("length", None), ("layers", None),
              ("stack", None), ("mlp_activations", None)]
    if additional_rules:
        rules += [tuple(rule) for rule in additional_rules]
    return tuple(rules)


def _default_rules(rules: LogicalRules | None) -> tuple[tuple[str, MeshAxes], ...]:
    return tuple(standard_logical_axis_rules() if rules is None else rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules | None = None) -> Iterator[Mesh]:
    """Activates `mesh` and the logical axis rules while tracing and running jitted code.

    Inside, flax's `nn.with_logical_constraint` and boxed parameters turn logical axis names into
    sharding constraints on `mesh`; outside, they are no-ops.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(_default_rules(rules)):
        yield mesh


# --------------------------------------------------------------------------------------------
# Logical specs -> shardings.
# --------------------------------------------------------------------------------------------


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def logical_to_sharding(logical_spec_tree: PyTree, mesh: Mesh, rules: LogicalRules | None = None) -> PyTree:
    """Maps a pytree of logical PartitionSpecs (None = replicated) to NamedShardings on `mesh`.

    Example: `logical_to_sharding(PartitionSpec('batch', 'length'), mesh)` ->
    `NamedSharding(mesh, PartitionSpec('data', None))` under the standard rules.
    """
    rules = _default_rules(rules)

    def convert(spec: PartitionSpec | None) -> NamedSharding:
        if spec is None:
            return replicated(mesh)
        return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules))

    return jax.tree.map(convert, logical_spec_tree, is_leaf=_is_spec)


def _fit_to_shape(mesh_spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide evenly.

    `jax.jit` requires explicit shardings to tile every dimension evenly; replicating such a
    dimension (e.g. 4 relative-position heads over an 8-way 'model' axis) keeps one configuration
    runnable on any mesh. Logged, since it costs memory.
    """
    if len(mesh_spec) > len(shape):
        # An array whose rank differs from its logical names (e.g. an optimizer's factored second
        # moment that inherited its parameter's box) cannot follow them: replicate it.
        logger.info("%s: logical axes %s do not fit shape %s; replicating.", where, mesh_spec, shape)
        return PartitionSpec()
    fitted = []
    for size, axes in zip(shape, mesh_spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(mesh.shape[a] for a in names)
        if names and size % ways:
            logger.warning("%s: dimension of size %d is not divisible by mesh axes %s (%d ways); "
                            "replicating it.", where, size, names, ways)
            axes = None
        fitted.append(axes)
    return PartitionSpec(*fitted)


def get_param_shardings(abstract_tree: PyTree, mesh: Mesh, rules: LogicalRules | None = None) -> PyTree:
    """NamedShardings for a (boxed) pytree, e.g. `jax.eval_shape(model.init, ...)` or a train state.

    Leaves boxed with `nn.with_logical_partitioning` follow their logical names through `rules`
    (a box's own rules win); everything else (step counters, unboxed arrays) is replicated. Each
    box is replaced by one sharding, so the result matches the unboxed tree and is a valid
    `jax.jit` in/out_shardings prefix of the boxed tree.

    Args:
      abstract_tree: Pytree of arrays or `jax.ShapeDtypeStruct`s, possibly with
        `nn.LogicallyPartitioned` boxes.
      mesh: The device mesh.
      rules: Logical axis rules; `standard_logical_axis_rules()` (gin-configured) by default.

    Returns:
      A pytree of `NamedSharding`s.
    """
    rules = _default_rules(rules)

    def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        if isinstance(leaf, meta.AxisMetadata):
            value = leaf.unbox(apply_constraint=False)
            logical = nn.get_partition_spec(leaf)
            leaf_rules = getattr(leaf, "rules", None) or rules
            mesh_spec = nn.logical_to_mesh_axes(tuple(logical), leaf_rules)
        else:
            value, mesh_spec = leaf, PartitionSpec()
        shape = tuple(getattr(value, "shape", ()))
        return NamedSharding(mesh, _fit_to_shape(mesh_spec, shape, mesh, tree_lib.path_str(path)))

    return jax.tree_util.tree_map_with_path(
        leaf_sharding, abstract_tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


# --------------------------------------------------------------------------------------------
# Train state.
# --------------------------------------------------------------------------------------------


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    """Places one host or device value onto a (possibly multi-host) sharding."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return jax.device_put(value, sharding)  # already global: a reshard
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    # Multi-host: every process holds the same full value; each fills its own devices' slices.
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def unbox(tree: PyTree) -> PyTree:
    """The arrays of a (partly) boxed tree, without sharding constraints.

    Optimizer moments inherit their parameter's box even when a factored moment has fewer dimensions
    than the names; a constraint there would fail, and the shardings place everything anyway.
    """
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box)


def _rebox(like: PyTree, values: PyTree) -> PyTree:
    """`values` (plain arrays) in the boxes of `like` (same structure, boxed), for their logical names."""
    return jax.tree.map(lambda box, value: box.replace_boxed(value) if _is_box(box) else value,
                        like, values, is_leaf=_is_box)


# --------------------------------------------------------------------------------------------
# The partitioner: how every stage builds, places, feeds and gathers sharded state.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Partitioner:
    """A device mesh with its logical axis rules, and the one way to put state and data on it.

    The counterpart of T5X's `PjitPartitioner`: every train state (policy, value network, reward model),
    every batch and every sharded program of a stage goes through one of these, so one process or many
    (a pod: one per host), one device or many, run the same code. States are plain arrays (T5X names);
    their logical axis names come from the boxes that `nn.with_logical_partitioning` puts on a model's
    abstract parameters.

    Example::

        part = Partitioner.create()                                    # gin: create_mesh.*, rules knobs
        state, shardings = part.init(lambda key: TrainState.create(model.init(key, x, y)['params'], opt), rng)
        step = part.partition(train_step, in_shardings=(shardings, None),
                              out_shardings=(shardings, part.replicated), donate_argnums=(0,))
        state, metrics = step(state, part.shard_batch(host_rows))
    """

    mesh: Mesh
    rules: tuple[tuple[str, MeshAxes], ...]

    @classmethod
    def create(cls, mesh: Mesh | None = None, rules: LogicalRules | None = None) -> "Partitioner":
        """The gin-configured mesh (`create_mesh`) and rules (`standard_logical_axis_rules`) by default."""
        return cls(mesh if mesh is not None else create_mesh(), _default_rules(rules))

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    def context(self) -> contextlib.AbstractContextManager[Mesh]:
        """Activates the mesh and rules (flax's logical constraints apply inside)."""
        return mesh_context(self.mesh, self.rules)

    def shardings(self, abstract: PyTree) -> PyTree:
        """NamedShardings of a (boxed) tree: boxes follow their logical names, other leaves replicate."""
        return get_param_shardings(abstract, self.mesh, self.rules)

    def init(self, fn: Callable[..., PyTree], *args: Any, like: Sequence[PyTree] | None = None,
             abstract_only: bool = False) -> tuple[PyTree, PyTree]:
        """Computes `fn(*args)` directly into its shards (never whole on one device); returns (tree, shardings).

        `fn` is traced abstractly first to read the logical names of what it returns; with `like`, it is
        traced on those (boxed abstract stand-ins of `args`, e.g. a model's abstract parameters for plain
        parameters already placed) so that a state derived from existing parameters (their optimizer
        moments) is sharded like them. With partitionable threefry (jax's default) a random init gives
        the values of an unsharded one with the same key.

        Args:
          fn: Returns a (boxed) pytree: an init, or a train state built from its arguments.
          *args: Arguments of `fn` (PRNG keys, placed arrays); close over non-array ones.
          like: Boxed stand-ins of `args` to trace `fn` on (None: `args` themselves).
          abstract_only: Return `jax.ShapeDtypeStruct`s carrying the shardings (a restore target).

        Returns:
          (the unboxed tree, its NamedShardings).
        """
        with self.context():
            boxed = jax.eval_shape(fn, *(args if like is None else like))
            shardings = self.shardings(boxed)
            if abstract_only:
                return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    unbox(boxed), shardings), shardings
            return jax.jit(lambda *a: unbox(fn(*a)), out_shardings=shardings)(*args), shardings

    def place(self, tree: PyTree, like: PyTree | None = None) -> tuple[PyTree, PyTree]:
        """Moves an existing tree (host arrays, one device, or another mesh) onto the mesh; returns (tree, shardings).

        Sharded by its own boxes, or, for plain arrays, by those of `like` (the same structure, boxed, e.g.
        a model's abstract parameters); leaves without names are replicated. Use for state that exists
        already (a restored checkpoint); to create state, `init`. In a multi-process job every process
        passes the same full values and each keeps its devices' slices.
        """
        boxed = tree if like is None else _rebox(like, tree)
        shardings = self.shardings(boxed)
        return self.put(unbox(boxed), shardings), shardings

    def put(self, tree: PyTree, shardings: PyTree) -> PyTree:
        """Places plain values on known shardings (e.g. from `init(..., abstract_only=True)`), multi-process safe."""
        return jax.tree.map(_put, tree, shardings)

    def partition(self, fn: Callable[..., Any], in_shardings: Any = None, out_shardings: Any = None,
                  donate_argnums: Sequence[int] = ()) -> "Partitioned":
        """`fn` jitted with these shardings, traced and run under the mesh and rules."""
        kwargs: dict[str, Any] = {"donate_argnums": tuple(donate_argnums)}
        if in_shardings is not None:
            kwargs["in_shardings"] = in_shardings
        if out_shardings is not None:
            kwargs["out_shardings"] = out_shardings
        return Partitioned(jax.jit(fn, **kwargs), self)

    def data_shard_info(self) -> tuple[int, int]:
        """(block index, number of blocks) of this process's rows of every global batch."""
        return data_shard_info(self.mesh, self.rules)

    def shard_batch(self, batch: PyTree) -> PyTree:
        """This process's rows of a batch as global arrays split along 'batch'."""
        return shard_batch(batch, self.mesh, self.rules)

    @staticmethod
    def gather(tree: PyTree) -> PyTree:
        """Host numpy copies of (possibly sharded, multi-process) arrays, the same on every process."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        return multihost_utils.process_allgather(tree, tiled=True)


class Partitioned:
    """A jitted function that is traced and run under its partitioner's mesh and rules (none: as it is)."""

    def __init__(self, jitted: Any, partitioner: Partitioner | None):
        self.jitted = jitted
        self.partitioner = partitioner

    def _context(self) -> contextlib.AbstractContextManager[Any]:
        return self.partitioner.context() if self.partitioner is not None else contextlib.nullcontext()

    def __call__(self, *args: Any) -> Any:
        with self._context():
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with self._context():
            return self.jitted.lower(*args)


# --------------------------------------------------------------------------------------------
# Batches.
# --------------------------------------------------------------------------------------------


def _batch_mesh_axes(mesh: Mesh, rules: LogicalRules | None) -> tuple[str, ...]:
    axes = nn.logical_to_mesh_axes(("batch",), _default_rules(rules))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"Logical axis 'batch' maps to mesh axes {unknown} that mesh "
                         f"{dict(mesh.shape)} does not have.")
    return axes


def data_shard_info(mesh: Mesh, rules: LogicalRules | None = None) -> tuple[int, int]:
    """(shard index, number of shards) of the input pipeline on this host.

    Hosts whose devices hold the same rows of a batch (a 'model' axis spanning hosts) must read the
    same examples; pass the result to the data pipeline (e.g. `seqio.ShardInfo(index, num_shards)`)
    and feed each host's rows to `shard_batch`.
    """
    batch_axes = _batch_mesh_axes(mesh, rules)
    positions = [mesh.axis_names.index(a) for a in batch_axes]
    coords_by_process: dict[int, set[int]] = {}
    for index in np.ndindex(mesh.devices.shape):
        device = mesh.devices[index]
        coord = int(np.ravel_multi_index(tuple(index[p] for p in positions),
                                         tuple(mesh.devices.shape[p] for p in positions))) if positions else 0
        coords_by_process.setdefault(device.process_index, set()).add(coord)
    groups = sorted({frozenset(c) for c in coords_by_process.values()}, key=min)
    for group in groups:
        if max(group) - min(group) + 1 != len(group) or any(g & group and g != group for g in groups):
            raise ValueError(f"Mesh {dict(mesh.shape)} gives host(s) a non-contiguous or partly shared set of "
                             "batch shards; reorder the mesh so each host holds whole, contiguous rows.")
    mine = frozenset(coords_by_process[jax.process_index()])
    return groups.index(mine), len(groups)


def shard_batch(batch: PyTree, mesh: Mesh, rules: LogicalRules | None = None) -> PyTree:
    """Turns this host's numpy batch into global `jax.Array`s split by rows along 'batch' ('data').

    Each host passes only its own rows (see `data_shard_info`); on one host that is the whole batch.
    Trailing dimensions are replicated; scalars are replicated.
    """
    batch_axes = _batch_mesh_axes(mesh, rules)
    _, num_shards = data_shard_info(mesh, rules)
    ways = math.prod(mesh.shape[a] for a in batch_axes)
    row_axes = batch_axes[0] if len(batch_axes) == 1 else (batch_axes or None)

    def put(path: tuple[Any, ...], local: Any) -> jax.Array:
        local = np.asarray(local)
        if local.ndim == 0:
            return _put(local, replicated(mesh))
        global_shape = (local.shape[0] * num_shards,) + local.shape[1:]
        if global_shape[0] % ways:
            raise ValueError(f"Batch feature '{tree_lib.path_str(path)}': global batch size {global_shape[0]} "
                             f"({local.shape[0]} rows on each of {num_shards} host shard(s)) is not "
                             f"divisible by the {ways}-way batch mesh axes {batch_axes}.")
        sharding = NamedSharding(mesh, PartitionSpec(row_axes, *([None] * (local.ndim - 1))))
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree_util.tree_map_with_path(put, batch)
