"""Graph rewrites. Each module holds one family of passes; a pass is a small object with a name,
a kind (exact / lossy / lowering) and a docstring saying what it matches and guarantees."""

from .base import Pass, PassKind, PassResult, StatisticRequest
from .qdq_insertion import InsertQDQ

__all__ = ["Pass", "PassKind", "PassResult", "StatisticRequest", "InsertQDQ"]
