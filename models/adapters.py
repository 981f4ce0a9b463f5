"""The one check of an adapter state, on either side of the wire (torch only).

An adapter state is a mapping of tensor name -> tensor (peft's adapter state dict, or a
strategy's global). The aggregator checks every agent's update against its global before the
update counts, and an agent checks every global it receives against its own adapter before
loading it; both go through `check_adapter_state`, which raises `InvalidUpdate` with a
`reason` that suits a metrics label:

    bad_num_examples   num_examples given and not an integer >= 1
    bad_tensors        tensor names, or a tensor's shape or dtype, differ from the expected state
    non_finite         a floating tensor holds NaN or Inf

`AdapterMismatch` is the same class under the name the agent side has used.

This module imports torch only, so that the pure layers above it (rounds, strategies) and the
agent can use it without model-loading code.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import torch

__all__ = ["AdapterMismatch", "InvalidUpdate", "check_adapter_state"]


class InvalidUpdate(ValueError):
    """An adapter state that must not be used; `reason` suits a metrics label, `agent_id` names
    the sender when known."""

    def __init__(self, reason: str, message: str, agent_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.agent_id = agent_id


AdapterMismatch = InvalidUpdate  # the agent side's name for it


_NOT_GIVEN = object()


def _valid_count(n: object) -> bool:
    return not isinstance(n, bool) and isinstance(n, numbers.Real) and math.isfinite(n) and n == int(n) and n >= 1


def check_adapter_state(expected: Mapping[str, torch.Tensor] | None, got: Mapping[str, torch.Tensor], *,
                        num_examples: object = _NOT_GIVEN, agent_id: str | None = None) -> None:
    """Raise InvalidUpdate unless `got` may be used in place of `expected`.

    In this order: `num_examples` (when given) is an integer >= 1; the tensor names equal
    `expected`'s, and each tensor's shape and dtype equal the expected one's (skipped when
    `expected` is None: there is no reference yet); every floating (or complex) tensor is finite.
    `agent_id`, when given, prefixes the message ("update from <agent_id>: ...") and is kept
    on the error."""
    prefix = f"update from {agent_id}: " if agent_id is not None else ""

    def fail(reason: str, message: str) -> InvalidUpdate:
        return InvalidUpdate(reason, prefix + message, agent_id)

    if num_examples is not _NOT_GIVEN and not _valid_count(num_examples):
        raise fail("bad_num_examples", f"num_examples must be >= 1, got {num_examples!r}")
    if expected is not None:
        if set(got) != set(expected):
            extra = sorted(set(got) - set(expected))[:3]
            missing = sorted(set(expected) - set(got))[:3]
            raise fail("bad_tensors", f"tensor names differ from the expected adapter (unexpected {extra}, missing {missing})")
        for k, t in got.items():
            e = expected[k]
            if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
                raise fail("bad_tensors", f"tensor {k} has shape {tuple(t.shape)} {t.dtype}, expected {tuple(e.shape)} {e.dtype}")
    for k, t in got.items():
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            raise fail("non_finite", f"tensor {k} has NaN or Inf values")
