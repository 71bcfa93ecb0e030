"""Packed zarr store and the common image-source interface (PNG folder or store)."""

from rcic.store.packed import COMPRESSIONS, PackedStore, PackResult, is_store, pack
from rcic.store.source import ImageSource, PngSource, StoreSource, open_source

__all__ = ["COMPRESSIONS", "ImageSource", "PackResult", "PackedStore", "PngSource", "StoreSource", "is_store",
           "open_source", "pack"]
