"""TensorRT plugins for the `fusegraph` collectives (AllReduce, AllGather, ReduceScatter):
`enqueue` calls NCCL through nccl4py on the plugin's stream.

- **Communicator** (`NcclGroup.from_env`): as TensorRT-LLM's NCCL plugins, one per process and
  group size, set up on first use from the environment: `RANK`, `WORLD_SIZE`, and a NCCL unique id
  shared through a file (`FUSEGRAPH_NCCL_ID_FILE`, default `/tmp/fusegraph-nccl-<WORLD_SIZE>.id`):
  rank 0 writes it atomically (temporary name, rename), the others wait for it. The rank
  process's current CUDA device is the one the communicator binds (TensorRT's, in a plugin).
  NVLink multicast (NVLS) is left off unless the caller set `NCCL_NVLS_ENABLE` itself.
- **Cores** (`CollectiveCore`): attributes, output shapes and dtypes, and `enqueue` on raw
  device pointers and a stream, with no TensorRT import, so that the GPU benchmark checks the very
  code path TensorRT runs (`benchmarks/bench_collectives.py`). An AllGather along an inner axis
  gathers rank-major into the workspace and then places each rank's block with one strided
  `cuMemcpy2DAsync`; a ReduceScatter along an inner axis packs rank-major first, the same way.
- **Adapters** (`register_all`): IPluginV3 classes for TensorRT / TensorRT-RTX (through
  `fusegraph.plugins.tensorrt_shim`), registered in namespace `fusegraph` beside the fused-op plugins.

Cost per call: one NCCL collective (plus `world_size` 2-D copies for an inner-axis gather or
scatter); the Python call into nccl4py is the launch overhead the benchmark reports.
"""

from __future__ import annotations

import math
import os
import time
from functools import lru_cache, partial
from typing import Any, Sequence

from .core import NAMESPACE, VERSION

#: NCCL's ncclDataType_t and ncclRedOp_t values (nccl.h; stable across NCCL 2.x)
NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
               "float32": 7, "float64": 8, "bfloat16": 9}
NCCL_OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3}
ITEMSIZE = {"int8": 1, "uint8": 1, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "float16": 2,
            "float32": 4, "float64": 8, "bfloat16": 2}
REDUCTIONS = tuple(NCCL_OPS)


class NcclGroup:
    """One NCCL communicator over `world_size` ranks (nccl4py's Communicator)."""

    _by_size: dict[int, "NcclGroup"] = {}

    def __init__(self, rank: int, world_size: int, id_file: str, timeout_s: float = 120.0):
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (shared GPUs)
        from nccl import core as nccl
        self.rank, self.world_size = rank, world_size
        if rank == 0:
            uid = nccl.get_unique_id()
            tmp = f"{id_file}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(uid.as_bytes)
            os.replace(tmp, id_file)
        else:
            deadline = time.monotonic() + timeout_s
            while not os.path.exists(id_file):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {rank}: no NCCL unique id in {id_file} after {timeout_s:.0f} s")
                time.sleep(0.01)
            with open(id_file, "rb") as f:
                uid = nccl.UniqueId.from_bytes(f.read())
        self.comm = nccl.Communicator.init(world_size, rank, uid)
        from nccl.bindings import nccl as bindings
        self._bindings = bindings
        self._handle = self.comm._comm  # what the raw bindings take (nccl4py's own calls pass it)

    @classmethod
    def from_env(cls, group_size: int) -> "NcclGroup":
        """The process's communicator for `group_size` ranks (made once, on first use)."""
        if group_size not in cls._by_size:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world != group_size:
                raise RuntimeError(f"a collective over {group_size} ranks, but WORLD_SIZE is {world}")
            rank = int(os.environ.get("RANK", "0"))
            id_file = os.environ.get("FUSEGRAPH_NCCL_ID_FILE", f"/tmp/fusegraph-nccl-{world}.id")
            cls._by_size[group_size] = cls(rank, world, id_file)
        return cls._by_size[group_size]

    def all_reduce(self, send: int, recv: int, count: int, dtype: str, op: str, stream: int) -> None:
        self._bindings.all_reduce(send, recv, count, NCCL_DTYPES[dtype], NCCL_OPS[op], self._handle, stream)

    def all_gather(self, send: int, recv: int, count: int, dtype: str, stream: int) -> None:
        self._bindings.all_gather(send, recv, count, NCCL_DTYPES[dtype], self._handle, stream)

    def reduce_scatter(self, send: int, recv: int, count: int, dtype: str, op: str, stream: int) -> None:
        self._bindings.reduce_scatter(send, recv, count, NCCL_DTYPES[dtype], NCCL_OPS[op], self._handle, stream)


class CollectiveCore:
    """One collective node's plugin logic (no TensorRT): op, group_size, reduction, axis."""

    dtypes = tuple(NCCL_DTYPES)

    def __init__(self, op: str, group_size: int, reduction: str = "sum", axis: int = 0, group: Any = None):
        if op not in ("AllReduce", "AllGather", "ReduceScatter"):
            raise ValueError(f"{op} is not a collective")
        if group_size < 1:
            raise ValueError(f"{op}: group_size {group_size} must be at least 1")
        if reduction not in NCCL_OPS:
            raise ValueError(f"{op}: reduction {reduction!r} is not one of {', '.join(NCCL_OPS)}")
        self.op, self.group_size, self.reduction, self.axis = op, group_size, reduction, axis
        self._group = group

    @property
    def group(self) -> NcclGroup:
        if self._group is None:
            self._group = NcclGroup.from_env(self.group_size)
        return self._group

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(shape)
        if self.op == "AllReduce":
            return shape
        axis = self.axis % len(shape)
        if self.op == "AllGather":
            return shape[:axis] + (shape[axis] * self.group_size,) + shape[axis + 1:]
        if shape[axis] % self.group_size:
            raise ValueError(f"ReduceScatter: axis {axis} of {shape} does not divide by {self.group_size}")
        return shape[:axis] + (shape[axis] // self.group_size,) + shape[axis + 1:]

    def workspace_bytes(self, shape: Sequence[int], dtype: str) -> int:
        """Scratch for an inner-axis gather / scatter (rank-major staging); 0 when axis 0."""
        if self.op == "AllReduce" or self.axis % len(shape) == 0 or self.group_size == 1:
            return 0
        big = shape if self.op == "ReduceScatter" else self.output_shape(shape)
        return math.prod(big) * ITEMSIZE[dtype]

    def enqueue(self, shape: Sequence[int], dtype: str, x: int, y: int, workspace: int, stream: int) -> None:
        count = math.prod(shape)
        g = self.group
        if self.op == "AllReduce":
            g.all_reduce(x, y, count, dtype, self.reduction, stream)
            return
        axis = self.axis % len(shape)
        outer = math.prod(shape[:axis])
        size = ITEMSIZE[dtype]
        if self.op == "AllGather":
            if axis == 0 or outer == 1:
                g.all_gather(x, y, count, dtype, stream)
                return
            g.all_gather(x, workspace, count, dtype, stream)
            block = count // outer * size  # bytes of one rank's row
            for r in range(self.group_size):  # rank-major [N, outer, block] -> [outer, N * block]
                _copy_2d(y + r * block, self.group_size * block, workspace + r * outer * block, block, block, outer, stream)
            return
        recv = count // self.group_size
        if axis == 0 or outer == 1:
            g.reduce_scatter(x, y, recv, dtype, self.reduction, stream)
            return
        block = recv // outer * size
        for r in range(self.group_size):  # [outer, N * block] -> rank-major [N, outer, block]
            _copy_2d(workspace + r * outer * block, block, x + r * block, self.group_size * block, block, outer, stream)
        g.reduce_scatter(workspace, y, recv, dtype, self.reduction, stream)


def _copy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: int) -> None:
    from cuda.bindings import driver
    p = driver.CUDA_MEMCPY2D()
    p.srcMemoryType = p.dstMemoryType = driver.CUmemorytype.CU_MEMORYTYPE_DEVICE
    p.srcDevice, p.srcPitch = driver.CUdeviceptr(src), src_pitch
    p.dstDevice, p.dstPitch = driver.CUdeviceptr(dst), dst_pitch
    p.WidthInBytes, p.Height = width, height
    err, = driver.cuMemcpy2DAsync(p, driver.CUstream(stream))
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuMemcpy2DAsync: {err}")


# --- TensorRT ------------------------------------------------------------------------------

FIELDS = (("group_size", "int"), ("reduction", "str"), ("axis", "int"))


def core_from_fields(op: str, fields: dict) -> CollectiveCore:
    return CollectiveCore(op, int(fields.get("group_size", 1)), str(fields.get("reduction", "sum")),
                          int(fields.get("axis", 0)))


@lru_cache(maxsize=None)
def plugin_classes() -> tuple[type, type]:
    from fusegraph.plugins import tensorrt_shim
    from .tensorrt_plugin import dtype_name, plugin_base
    import numpy as np
    trt = tensorrt_shim.load()

    def to_fields(core: CollectiveCore, keep: list):
        """The fields TensorRT stores; `keep` holds their arrays alive (a PluginField only points
        at its array's memory: a temporary one is freed before TensorRT reads it)."""
        keep[:] = [np.array([core.group_size], np.int32), np.frombuffer(core.reduction.encode(), np.int8).copy(),
                   np.array([core.axis], np.int32)]
        return trt.PluginFieldCollection([
            trt.PluginField("group_size", keep[0], trt.PluginFieldType.INT32),
            trt.PluginField("reduction", keep[1], trt.PluginFieldType.CHAR),
            trt.PluginField("axis", keep[2], trt.PluginFieldType.INT32)])

    class Plugin(plugin_base()):
        def __init__(self, core: CollectiveCore) -> None:
            super().__init__(core, 1)
            self._field_arrays: list = []

        def clone(self) -> "Plugin":
            c = self.core
            return Plugin(CollectiveCore(c.op, c.group_size, c.reduction, c.axis))

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[0]]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], expr_builder: Any) -> list[Any]:
            dims = [inputs[0][d] for d in range(len(inputs[0]))]
            if self.core.op != "AllReduce":
                axis = self.core.axis % len(dims)
                n = expr_builder.constant(self.core.group_size)
                op = trt.DimensionOperation.PROD if self.core.op == "AllGather" else trt.DimensionOperation.FLOOR_DIV
                dims[axis] = expr_builder.operation(op, dims[axis], n)
            return [trt.DimsExprs(dims)]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return dtype_name(desc.type) in ("float32", "float16", "bfloat16", "int32", "int64")
            return desc.type == in_out[0].desc.type

        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            self.core.output_shape(tuple(inputs[0].dims))  # refuses an axis that does not divide

        def get_workspace_size(self, inputs: list[Any], outputs: list[Any]) -> int:
            d = inputs[0].max
            return self.core.workspace_bytes(tuple(d), dtype_name(inputs[0].desc.type))

        def get_fields_to_serialize(self) -> Any:
            return to_fields(self.core, self._field_arrays)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
            self.core.enqueue(tuple(input_desc[0].dims), dtype_name(input_desc[0].type), int(inputs[0]),
                              int(outputs[0]), int(workspace), int(stream))

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, op: str) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.op = self.name = op
            self.plugin_namespace, self.plugin_version = NAMESPACE, VERSION
            self._field_arrays: list = []
            self.field_names = to_fields(CollectiveCore(op, 1), self._field_arrays)

        def create_plugin(self, name: str, fields: Any, phase: Any) -> Plugin:
            values = {}
            for f in fields:
                if f.name in ("plugin_version", "plugin_namespace"):
                    continue
                data = np.asarray(f.data)
                values[f.name] = bytes(data.astype(np.uint8)).decode().rstrip("\0") if f.name == "reduction" \
                    else int(data.reshape(-1)[0])
            return Plugin(core_from_fields(self.op, values))

    return Plugin, Creator


_registered: dict[str, Any] = {}


def register_all() -> list[dict[str, str]]:
    """Register the three collective creators (idempotent); what is registered."""
    from .tensorrt_plugin import register_creators
    _, creator_cls = plugin_classes()
    return register_creators(_registered, {op: partial(creator_cls, op) for op in ("AllReduce", "AllGather",
                                                                                  "ReduceScatter")})
