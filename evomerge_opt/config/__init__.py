"""Config schemas (pool, recipes, search spaces) and YAML load/save."""

from evomerge_opt.config.yamlio import dump_yaml, load_yaml, save_yaml

__all__ = ["dump_yaml", "load_yaml", "save_yaml"]
