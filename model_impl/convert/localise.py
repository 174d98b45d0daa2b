"""Where two models first differ: the input of block 0, each block's output, the logits.

SRC (through its own remote code) and a converted checkpoint (through model_impl) run
the same ids; block i of SRC is found through the name map. The first place whose
relative difference is beyond float noise is where the conversion went wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import LayerMap
from .structure import MATCH, relative_diff, trace


@dataclass(frozen=True)
class Place:
    name: str  # e.g. "block 3 output"
    where: str  # the modules compared, SRC's and ours
    relative: float  # max |ours - SRC| / max |SRC|

    @property
    def differs(self) -> bool:
        return not self.relative < MATCH


def compare_places(src: nn.Module, layout: LayerMap, ours: nn.Module, ids: torch.Tensor) -> list[Place]:
    width = layout.width
    theirs = trace(src, [src.get_submodule(layout.block(i)) for i in range(layout.num_layers)], ids, width)
    mine = trace(ours, list(ours.model.layers), ids, width)
    kind = "input codes" if ours.config.input_kind == "codes" else "input table rows"
    places = [Place(kind, f"what enters {layout.block(0)} / model.layers.0",
                    relative_diff(mine.block_inputs[0], theirs.block_inputs[0]))]
    for i in range(layout.num_layers):
        places.append(Place(f"block {i} output", f"{layout.block(i)} / model.layers.{i}",
                            relative_diff(mine.block_outputs[i], theirs.block_outputs[i])))
    places.append(Place("logits", f"{layout.family.final_norm} + {layout.family.head} / model.norm + lm_head",
                        relative_diff(mine.logits, theirs.logits)))
    return places


def first_difference(places: list[Place]) -> Place | None:
    return next((p for p in places if p.differs), None)
