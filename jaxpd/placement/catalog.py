"""The hardware catalog and the inventory the placer plans over, read from YAML.

Device figures live in `configs/hardware/<key>.yaml`, one device kind a file, each figure with
its source in a comment, so a reviewer can check them and a user can add a device without code.
An inventory (`configs/inventory/*.yaml`) says how many of which device kind are available, at
what price; `load_inventory` turns it into the placer's `PoolSpec`s. Every error names the file
and the key path as the user reads the YAML (`inv.yaml: pools[1].device: ...`), since a typo in
an inventory is the likeliest failure and the placer's output is only as good as these figures.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jaxpd.placement.cost_model import Roofline
from jaxpd.placement.placer import PoolSpec

CATALOG_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"


class CatalogError(ValueError):
    """A catalog or inventory file that cannot be used; the message names the file and key."""


class DeviceSpec(BaseModel):
    """One device kind; every figure is per device (GPU or TPU chip)."""

    model_config = ConfigDict(extra="forbid")

    key: str  # the file stem, what inventories refer to
    name: str
    vendor: Literal["nvidia", "google"]
    bf16_flops: float = Field(gt=0)  # dense, not sparsity figures
    hbm_bytes: float = Field(gt=0)
    hbm_bandwidth: float = Field(gt=0)  # bytes/s
    link_bandwidth: float = Field(ge=0)  # intra-node bytes/s per direction; 0 = none (PCIe only)
    network_bandwidth: float = Field(ge=0)  # bytes/s per device to other hosts
    max_tp: int = Field(ge=1)  # the widest TP on one host
    devices_per_host: int = Field(ge=1)  # in the hosts a multi-host replica spans
    max_slice_tp: int | None = Field(default=None, ge=1)  # wider TP over several hosts on the
    # same fast link (a TPU slice's ICI); None: the link stops at the host (max_tp)
    power_watts: float | None = Field(default=None, gt=0)  # None where the vendor publishes none
    price_per_hour: float = Field(gt=0)  # USD per device-hour, on demand
    fp8_flops: float | None = Field(default=None, gt=0)  # dense FP8 peak; None: the device has
    # no FP8 matmul (A100) or its vendor lists none (TPUs). jaxpd's FP8 weights dequantize to
    # bf16 before the matmul, so they are priced at bf16_flops; this peak is for the record
    collective_latency_us: float | None = Field(default=None, ge=0)  # one small all-reduce over
    # the TP link (nccl-tests' latency floor); None: no published figure (priced as 0)
    sources: dict[str, str]  # every figure above: "URL (what, YYYY-MM-DD)"

    @model_validator(mode="after")
    def _every_figure_has_a_source(self) -> DeviceSpec:
        for name in SOURCED:
            if getattr(self, name) is None:
                continue
            where = self.sources.get(name)
            if where is None:
                raise ValueError(f"sources.{name}: missing (a URL and the date it was read)")
            if not _URL.search(where) or not _DATE.search(where):
                raise ValueError(f"sources.{name}: {where!r} needs a URL and a date (YYYY-MM-DD)")
        return self

    def roof(self) -> Roofline:
        return Roofline(flops=self.bf16_flops, bandwidth=self.hbm_bandwidth,
                        memory=self.hbm_bytes, link_bandwidth=self.link_bandwidth,
                        collective_latency=(self.collective_latency_us or 0.0) / 1e6)


# the figures a device file must source (those it sets)
SOURCED = ("bf16_flops", "fp8_flops", "hbm_bytes", "hbm_bandwidth", "link_bandwidth",
           "network_bandwidth", "collective_latency_us", "power_watts", "price_per_hour")
_URL = re.compile(r"https?://\S+")
_DATE = re.compile(r"\b20\d\d-\d\d(-\d\d)?\b")


class PoolEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    device: str  # a catalog key
    count: int = Field(ge=1)
    price_per_hour: float | None = Field(default=None, gt=0)  # overrides the catalog's
    node_labels: dict[str, str] = {}  # Kubernetes node labels of this pool (manifests select them)


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: list[PoolEntry] = Field(min_length=1)

    @field_validator("pools")
    @classmethod
    def _unique_names(cls, pools: list[PoolEntry]) -> list[PoolEntry]:
        seen: set[str] = set()
        for pool in pools:
            if pool.name in seen:
                raise ValueError(f"pool name {pool.name!r} appears twice")
            seen.add(pool.name)
        return pools


# ---------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_mapping(path: Path) -> dict:
    """The file's top-level mapping, or a CatalogError naming the file (and line, for YAML)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such file") from None
    except OSError as e:
        raise CatalogError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise CatalogError(f"{path}: invalid YAML{_where(e)}: {_problem(e)}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: the top level must be a mapping, not {_kind(data)}")
    return data


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _problem(e: yaml.YAMLError) -> str:
    return getattr(e, "problem", None) or str(e)


def _kind(data: object) -> str:
    return "an empty file" if data is None else f"a {type(data).__name__}"


# ---------------------------------------------------------------------------- errors


def _key_path(loc: tuple[int | str, ...]) -> str:
    """('pools', 1, 'device') -> 'pools[1].device', as the user reads the YAML."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_message(source: str, err: pydantic.ValidationError) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        where = _key_path(e["loc"])
        lines.append(f"{source}: {where}: {msg}" if where else f"{source}: {msg}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- catalog


def _parse_device(data: dict, key: str, source: str) -> DeviceSpec:
    if "key" in data and data["key"] != key:
        raise CatalogError(f"{source}: key: {data['key']!r} differs from the file name {key!r}; "
                           "the key is the file name, remove it")
    try:
        return DeviceSpec.model_validate({**data, "key": key})
    except pydantic.ValidationError as e:
        raise CatalogError(_validation_message(source, e)) from None


def load_device(path: str | Path) -> DeviceSpec:
    path = Path(path)
    return _parse_device(_read_mapping(path), path.stem, str(path))


def load_catalog(directory: str | Path | None = None) -> dict[str, DeviceSpec]:
    """Every `*.yaml` in `directory` (default: the shipped `configs/hardware`), by file stem."""
    directory = Path(CATALOG_DIR if directory is None else directory)
    if not directory.is_dir():
        raise CatalogError(f"{directory}: no such directory")
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise CatalogError(f"{directory}: no *.yaml device files")
    return {f.stem: load_device(f) for f in files}


# ---------------------------------------------------------------------------- inventory


def _pool_spec(entry: PoolEntry, device: DeviceSpec) -> PoolSpec:
    price = device.price_per_hour if entry.price_per_hour is None else entry.price_per_hour
    return PoolSpec(name=entry.name, device=device.key, vendor=device.vendor, count=entry.count,
                    price_per_device_hour=price, roof=device.roof(), max_tp=device.max_tp,
                    network_bandwidth=device.network_bandwidth,
                    devices_per_host=device.devices_per_host,
                    max_slice_tp=device.max_slice_tp or device.max_tp,
                    node_labels=tuple(sorted(entry.node_labels.items())))


def parse_inventory(data: Mapping[str, Any], source: str,
                    catalog: Mapping[str, DeviceSpec] | None = None) -> list[PoolSpec]:
    """An inventory already read into `data`; `source` names it in errors."""
    if not isinstance(data, Mapping):
        raise CatalogError(f"{source}: the top level must be a mapping, not {_kind(data)}")
    try:
        inventory = Inventory.model_validate(data)
    except pydantic.ValidationError as e:
        raise CatalogError(_validation_message(source, e)) from None
    catalog = load_catalog() if catalog is None else catalog
    for i, entry in enumerate(inventory.pools):
        if entry.device not in catalog:
            known = ", ".join(sorted(catalog))
            raise CatalogError(f"{source}: pools[{i}].device: unknown device {entry.device!r} "
                               f"(known: {known})")
    return [_pool_spec(entry, catalog[entry.device]) for entry in inventory.pools]


def load_inventory(path: str | Path,
                   catalog: Mapping[str, DeviceSpec] | None = None) -> list[PoolSpec]:
    """The pools of an inventory file, priced from the catalog unless a pool overrides it."""
    path = Path(path)
    return parse_inventory(_read_mapping(path), str(path), catalog)
