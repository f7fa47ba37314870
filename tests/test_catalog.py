"""The hardware catalog and inventories: the shipped files load, and bad files say where."""

import re
import shutil
from pathlib import Path

import pytest

from jaxpd.placement.catalog import (CATALOG_DIR, CatalogError, DeviceSpec, load_catalog,
                                     load_inventory, parse_inventory)
from jaxpd.placement.cost_model import Roofline
from jaxpd.placement.placer import PoolSpec

REPO = Path(__file__).resolve().parents[1]
INVENTORIES = sorted((REPO / "configs" / "inventory").glob("*.yaml"))
KEYS = {"h100-sxm", "h200", "a100-80gb", "l4", "l40s", "tpu-v5e", "tpu-v5p", "tpu-v6e"}


@pytest.fixture(scope="module")
def catalog() -> dict[str, DeviceSpec]:
    return load_catalog()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- shipped


def test_the_shipped_catalog_has_every_device_kind(catalog):
    assert CATALOG_DIR == REPO / "configs" / "hardware"
    assert set(catalog) == KEYS
    assert all(spec.key == key for key, spec in catalog.items())


def test_the_figures_are_sane(catalog):
    h100, a100, h200 = catalog["h100-sxm"], catalog["a100-80gb"], catalog["h200"]
    assert h100.bf16_flops > a100.bf16_flops and h100.hbm_bandwidth > a100.hbm_bandwidth
    assert h100.link_bandwidth > a100.link_bandwidth
    assert h200.hbm_bytes > h100.hbm_bytes and h200.hbm_bandwidth > h100.hbm_bandwidth
    for key in ("l4", "l40s"):  # PCIe only, no NVLink
        assert catalog[key].max_tp == 1 and catalog[key].link_bandwidth == 0
    for key, spec in catalog.items():
        assert spec.vendor == ("google" if key.startswith("tpu-") else "nvidia")
        # dense figures, within what exists today: 10 TFLOP/s .. 2.5 PFLOP/s, 8 .. 300 GB
        assert 1e13 < spec.bf16_flops < 2.5e15 and 8e9 <= spec.hbm_bytes <= 300e9
        assert spec.max_tp in (1, 2, 4, 8) and 0 < spec.price_per_hour < 50


def test_every_catalog_figure_names_its_source():
    for path in sorted(CATALOG_DIR.glob("*.yaml")):
        for line in path.read_text().splitlines():
            if re.match(r"(bf16_flops|hbm_|link_|network_|max_tp|power_|price_)", line):
                assert "#" in line, f"{path.name}: no source comment on {line!r}"


def test_every_figure_has_a_source_url_and_date(catalog, tmp_path):
    """The loader refuses a device file whose figure has no `sources` entry with a URL and a
    date; every shipped file passes, FP8 peaks and collective latency included where set."""
    for spec in catalog.values():
        for name in ("bf16_flops", "hbm_bandwidth", "price_per_hour"):
            assert "http" in spec.sources[name]
    assert catalog["h100-sxm"].fp8_flops == 2 * catalog["h100-sxm"].bf16_flops + 1e12
    assert catalog["a100-80gb"].fp8_flops is None and catalog["tpu-v6e"].fp8_flops is None
    assert catalog["h100-sxm"].roof().collective_latency == pytest.approx(12.5e-6)
    text = (CATALOG_DIR / "l4.yaml").read_text()
    _write(tmp_path / "l4.yaml", text.replace(
        '  price_per_hour: "https://cloud.google.com/compute/gpus-pricing (g2-standard-4, '
        'us-central1, 2026-12-01)"\n', '  price_per_hour: "the GCP pricing page"\n'))
    with pytest.raises(CatalogError, match=r"sources\.price_per_hour: 'the GCP pricing page' "
                                            r"needs a URL and a date"):
        load_catalog(tmp_path)
    _write(tmp_path / "l4.yaml", re.sub(r'  fp8_flops: ".*"\n', "", text))
    with pytest.raises(CatalogError, match=r"sources\.fp8_flops: missing"):
        load_catalog(tmp_path)


def test_roof_maps_the_fields(catalog):
    l4 = catalog["l4"]
    assert l4.roof() == Roofline(flops=l4.bf16_flops, bandwidth=l4.hbm_bandwidth,
                                 memory=l4.hbm_bytes, link_bandwidth=l4.link_bandwidth)
    assert catalog["h100-sxm"].roof() == Roofline(989e12, 3.35e12, 80e9, 450e9, 12.5e-6)


@pytest.mark.parametrize("path", INVENTORIES, ids=lambda p: p.stem)
def test_every_shipped_inventory_loads(path, catalog):
    pools = load_inventory(path, catalog)
    assert pools and all(isinstance(p, PoolSpec) for p in pools)
    for pool in pools:
        spec = catalog[pool.device]
        assert (pool.vendor, pool.roof, pool.max_tp) == (spec.vendor, spec.roof(), spec.max_tp)
        assert pool.network_bandwidth == spec.network_bandwidth
        assert pool.price_per_device_hour > 0


def test_the_shipped_inventories_are_the_ones_described(catalog):
    names = {p.stem for p in INVENTORIES}
    assert {"mixed-gpu", "gpu-and-tpu", "large-1000"} <= names
    large = load_inventory(REPO / "configs" / "inventory" / "large-1000.yaml", catalog)
    assert sum(p.count for p in large) == 1000 and len({p.device for p in large}) == 6
    mixed = load_inventory(REPO / "configs" / "inventory" / "gpu-and-tpu.yaml", catalog)
    assert {p.vendor for p in mixed} == {"nvidia", "google"}


def test_the_pool_price_overrides_the_catalog(tmp_path, catalog):
    inv = _write(tmp_path / "inv.yaml", "pools:\n"
                 "  - {name: spot, device: h100-sxm, count: 8, price_per_hour: 2.5}\n"
                 "  - {name: list, device: h100-sxm, count: 8}\n")
    spot, listed = load_inventory(inv, catalog)
    assert spot.price_per_device_hour == 2.5
    assert listed.price_per_device_hour == catalog["h100-sxm"].price_per_hour


def test_parse_inventory_in_memory_and_default_catalog():
    (pool,) = parse_inventory({"pools": [{"name": "a", "device": "tpu-v6e", "count": 8}]}, "<mem>")
    assert (pool.name, pool.device, pool.vendor, pool.count) == ("a", "tpu-v6e", "google", 8)


def test_a_custom_catalog_directory(tmp_path):
    shutil.copy(CATALOG_DIR / "l4.yaml", tmp_path / "my-l4.yaml")
    assert set(load_catalog(tmp_path)) == {"my-l4"}
    assert load_catalog(str(tmp_path))["my-l4"].key == "my-l4"


# ---------------------------------------------------------------------------- inventory errors


@pytest.mark.parametrize("pools, message", [
    ("[{name: a, device: l4, count: 1}, {name: b, device: h300, count: 1}]",
     r"inv\.yaml: pools\[1\]\.device: unknown device 'h300' \(known: a100-80gb, h100-sxm, "),
    ("[{name: a, device: l4, count: 0}]",
     r"inv\.yaml: pools\[0\]\.count: Input should be greater than or equal to 1"),
    ("[{name: a, device: l4, count: 1}, {name: a, device: h100-sxm, count: 8}]",
     r"inv\.yaml: pools: pool name 'a' appears twice"),
    ("[{name: a, device: l4, count: 1, gpus: 4}]",
     r"inv\.yaml: pools\[0\]\.gpus: Extra inputs are not permitted"),
    ("[{name: a, count: 1}]", r"inv\.yaml: pools\[0\]\.device: Field required"),
    ("[{name: a, device: l4, count: 1, price_per_hour: -1}]",
     r"inv\.yaml: pools\[0\]\.price_per_hour: Input should be greater than 0"),
    ("[]", r"inv\.yaml: pools: List should have at least 1 item"),
])
def test_inventory_errors_name_the_file_and_key(tmp_path, catalog, pools, message):
    inv = _write(tmp_path / "inv.yaml", f"pools: {pools}\n")
    with pytest.raises(CatalogError, match=message):
        load_inventory(inv, catalog)


def test_an_unknown_top_level_key(tmp_path, catalog):
    inv = _write(tmp_path / "inv.yaml", "pools: [{name: a, device: l4, count: 1}]\nregion: x\n")
    with pytest.raises(CatalogError, match=r"inv\.yaml: region: Extra inputs are not permitted"):
        load_inventory(inv, catalog)


def test_malformed_yaml_names_the_line(tmp_path, catalog):
    inv = _write(tmp_path / "inv.yaml", "pools:\n  - name: a\n    device: [l4\n    count: 1\n")
    with pytest.raises(CatalogError, match=r"inv\.yaml: invalid YAML at line \d+, column \d+"):
        load_inventory(inv, catalog)


def test_a_key_given_twice_is_an_error(tmp_path, catalog):
    inv = _write(tmp_path / "inv.yaml", "pools:\n  - name: a\n    device: l4\n    count: 1\n"
                 "    count: 2\n")
    message = r"inv\.yaml: invalid YAML at line 5.*duplicate key 'count'"
    with pytest.raises(CatalogError, match=message):
        load_inventory(inv, catalog)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("", "an empty file"),
                                        ("just text\n", "a str")])
def test_the_top_level_must_be_a_mapping(tmp_path, catalog, text, kind):
    inv = _write(tmp_path / "inv.yaml", text)
    message = rf"inv\.yaml: the top level must be a mapping, not {kind}"
    with pytest.raises(CatalogError, match=message):
        load_inventory(inv, catalog)


def test_a_missing_inventory_file(tmp_path, catalog):
    with pytest.raises(CatalogError, match=r"nope\.yaml: no such file"):
        load_inventory(tmp_path / "nope.yaml", catalog)


def test_parse_inventory_names_the_source(catalog):
    data = {"pools": [{"name": "a", "device": "l4", "count": "many"}]}
    message = r"<cli>: pools\[0\]\.count: Input should be a valid int"
    with pytest.raises(CatalogError, match=message):
        parse_inventory(data, "<cli>", catalog)


# ---------------------------------------------------------------------------- catalog errors


def _bad_catalog(tmp_path: Path, edit) -> Path:
    directory = tmp_path / "hardware"
    directory.mkdir()
    text = (CATALOG_DIR / "h100-sxm.yaml").read_text()
    _write(directory / "h100-sxm.yaml", edit(text))
    return directory


def test_a_negative_price_in_a_catalog_file(tmp_path):
    directory = _bad_catalog(
        tmp_path, lambda t: re.sub(r"price_per_hour: [\d.]+", "price_per_hour: -3", t))
    message = r"hardware/h100-sxm\.yaml: price_per_hour: Input should be greater than 0"
    with pytest.raises(CatalogError, match=message):
        load_catalog(directory)


@pytest.mark.parametrize("edit, message", [
    (lambda t: re.sub(r"^hbm_bandwidth:.*\n", "", t, flags=re.M),
     r"h100-sxm\.yaml: hbm_bandwidth: Field required"),
    (lambda t: t + "fp16_flops: 1979.0e+12\n",
     r"h100-sxm\.yaml: fp16_flops: Extra inputs are not permitted"),
    (lambda t: t.replace("max_tp: 8", "max_tp: : 8"), r"h100-sxm\.yaml: invalid YAML at line \d+"),
    (lambda t: t + "key: h100\n", r"h100-sxm\.yaml: key: 'h100' differs from the file name"),
], ids=["missing-field", "unknown-key", "malformed-yaml", "key-disagrees"])
def test_a_broken_catalog_file_names_file_and_key(tmp_path, edit, message):
    with pytest.raises(CatalogError, match=message):
        load_catalog(_bad_catalog(tmp_path, edit))


def test_a_wrong_vendor_and_zero_max_tp_are_both_reported(tmp_path):
    directory = _bad_catalog(tmp_path, lambda t: t.replace("vendor: nvidia", "vendor: amd")
                             .replace("max_tp: 8", "max_tp: 0"))
    with pytest.raises(CatalogError) as info:
        load_catalog(directory)
    assert "h100-sxm.yaml: vendor: Input should be 'nvidia' or 'google'" in str(info.value)
    assert "h100-sxm.yaml: max_tp: Input should be greater than or equal to 1" in str(info.value)


def test_an_empty_or_missing_catalog_directory(tmp_path):
    with pytest.raises(CatalogError, match=r"no \*\.yaml device files"):
        load_catalog(tmp_path)
    with pytest.raises(CatalogError, match=r"missing: no such directory"):
        load_catalog(tmp_path / "missing")
