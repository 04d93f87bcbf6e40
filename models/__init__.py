"""Backbone catalogue (``catalogue.py``) and the default landing place of built ROMs (``rom/``)."""

from .catalogue import DEFAULT_BACKBONE, REGISTRY, BackboneSpec, WeightSource, default_rom_dir, get_spec, list_backbones

__all__ = ["DEFAULT_BACKBONE", "REGISTRY", "BackboneSpec", "WeightSource", "default_rom_dir", "get_spec", "list_backbones"]
