"""What the control API needs of a simulator, as a Protocol: the control module depends on this and
on the fault settings only, never on the server module (which starts the control API), so the two
do not import each other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from smsc.sim.faults import FaultSettings


class ControlledSimulator(Protocol):
    """The part of `smsc.sim.server.Simulator` an operator drives at run time."""

    @property
    def port(self) -> int:
        """The SMPP port listened on; RuntimeError before the simulator has started."""
        ...

    @property
    def faults(self) -> FaultSettings:
        """The fault settings in force."""
        ...

    def set_faults(self, **changes: Any) -> FaultSettings:
        """Merge `changes` into the settings; pydantic's ValidationError (nothing changed) on bad input."""
        ...

    def replace_faults(self, settings: FaultSettings | Mapping[str, Any]) -> FaultSettings:
        """Replace all settings; fields not given take the defaults (all faults off)."""
        ...

    def reset(self) -> FaultSettings:
        """Settings back to those given at construction; fault counters and rates cleared."""
        ...

    def stats(self) -> dict[str, Any]:
        """Protocol and fault counters, for the control API's answers."""
        ...
