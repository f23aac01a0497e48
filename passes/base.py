"""What a pass is: a small named object with one job, reporting whether it changed the graph."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from ..context import CompileContext
from ..ir import Graph


class PassKind(Enum):
    """Sets how a pass is tested: exact passes keep float results, lossy ones stay within the
    quantization step, lowerings match their QDQ form within one step."""

    EXACT = "exact"
    LOSSY = "lossy"
    LOWERING = "lowering"


@dataclass
class PassResult:
    modified: bool
    changes: list[str] = field(default_factory=list)


class Pass(ABC):
    """Subclasses state in their docstring what they match and what they guarantee."""

    name: ClassVar[str]
    kind: ClassVar[PassKind]

    @abstractmethod
    def run(self, graph: Graph, context: CompileContext) -> PassResult: ...
