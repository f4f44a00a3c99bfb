"""K/V storage, one store per attention kind (named in its record, kvlab/kinds), and the model-wide cache."""

from .cache import Cache
from .storage import FullKV, KVStore, WindowKV

__all__ = ["Cache", "FullKV", "KVStore", "WindowKV"]
