"""Config-node helpers shared by the modules that read `conf/` groups (slo, workloads, energy, the env)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig as plain containers (omegaconf is imported only when one is passed)."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def check_keys(what: str, given: Mapping[str, Any], valid: tuple[str, ...],
               error: type[ValueError] = ValueError) -> None:
    """Raise `error` naming the unknown keys of `given` and the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise error(f"unknown key(s) {unknown} in {what}; valid: {list(valid)}")
