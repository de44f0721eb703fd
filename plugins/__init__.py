"""TensorRT plugins for fusegraph ops.

`core` holds each plugin's logic without TensorRT; `tensorrt_plugin` adapts it to IPluginV3.
"""


def register_all() -> list[dict[str, str]]:
    """Register every fusegraph plugin creator with TensorRT (imports TensorRT only when called):
    the fused ops' and the collectives' (AllReduce, AllGather, ReduceScatter through NCCL)."""
    from .collectives import register_all as register_collectives
    from .tensorrt_plugin import register_all as register

    return register() + register_collectives()
