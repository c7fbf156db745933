"""Where ``tiny`` used to live: it is now a registered dataset (:mod:`taskbalance.data.tiny`) and
architecture (:mod:`taskbalance.models.tiny`); these names are re-exported for existing imports."""

from ..data.tiny import tiny_data
from ..models.tiny import TinyModel

__all__ = ["tiny_data", "TinyModel"]
