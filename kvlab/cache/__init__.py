"""K/V storage policies, one per attention kind, and the model-wide cache that holds them."""

from . import cca, compressed, latent  # noqa: F401  (register the "cca", "csa", "hca" and "mla" storage policies)
from .cache import Cache, register_policy
from .storage import FullKV, KVStore, WindowKV

__all__ = ["Cache", "FullKV", "KVStore", "WindowKV", "register_policy"]
