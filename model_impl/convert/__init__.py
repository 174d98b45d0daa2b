"""Inspect, recover and convert checkpoints whose layout is not this project's.

The published checkpoint ships its own remote code and unpublished names. These modules
read it (`source`), map its tensor names (`families`), recover its input code by probing
what enters the first block (`probe`), identify its block's structural choices by
comparing candidate configs with its outputs (`structure`), find where two models first
differ (`localise`), report what a checkpoint holds from its headers (`inspection`) and
write it in this project's layout (`convert`). Pure PyTorch + Transformers: no vLLM.
"""

from .errors import ConvertError

__all__ = ["ConvertError"]
