"""In-process KV hand-off: bytes arrive unchanged across meshes with different TP degrees."""

import numpy as np
import pytest

from conftest import HF_FIXTURES
from jaxpd.engine.request import Request, Sequence
from jaxpd.engine.prefill import PrefillEngine
from jaxpd.engine.runner import ModelRunner
from jaxpd.errors import ConfigError
from jaxpd.kv.layout import KVLayout, canonical_heads
from jaxpd.kv.manager import KVCacheManager
from jaxpd.model.checkpoint import load_model
from jaxpd.model.sharding import make_mesh, shard_params
from jaxpd.transfer.device import DeviceTransport


def _side(model, devices, tp, pages=32, page_size=4):
    mesh = make_mesh(devices, tp)
    layout = KVLayout.for_model(model.config, tp=tp, page_size=page_size)
    manager = KVCacheManager(layout, pages, mesh)
    return ModelRunner(model.config, shard_params(model.params, model.config, mesh), mesh, manager,
                       "reference")


@pytest.mark.parametrize("src_tp, dst_tp", [(4, 2), (2, 4), (1, 8)])
def test_transfer_is_byte_exact_across_tp(devices, src_tp, dst_tp):
    model = load_model(HF_FIXTURES / "llama")  # 2 KV heads: TP 4 and 8 replicate them
    src = _side(model, devices[:src_tp], src_tp)
    dst = _side(model, devices[8 - dst_tp:], dst_tp)
    seq = Sequence(Request("x", tuple(range(3, 22))), seed=0)
    engine = PrefillEngine(src, chunk_size=16)
    assert engine.admit(seq)
    while not engine.step([seq]):
        pass
    src_pages = seq.pages.pages
    dst_pages = dst.manager.allocate(len(seq.tokens)).pages[:len(src_pages)]
    DeviceTransport().transfer(src.manager, src_pages, dst.manager, dst_pages)
    for layer in range(model.config.num_layers):
        for kind in ("k", "v"):
            a = np.asarray(canonical_heads(getattr(src.manager.kv, kind)[layer], src.manager.layout, 0))
            b = np.asarray(canonical_heads(getattr(dst.manager.kv, kind)[layer], dst.manager.layout, 0))
            assert a[:, src_pages].tobytes() == b[:, dst_pages].tobytes()
            stored = getattr(dst.manager.kv, kind)[layer]
            assert stored.shape[0] == dst.manager.layout.kv_heads
            if dst.manager.layout.head_repeat > 1:  # every replica carries the same bytes
                r = dst.manager.layout.head_repeat
                full = np.asarray(stored)[:, dst_pages]
                assert all(full[h].tobytes() == full[h - h % r].tobytes() for h in range(full.shape[0]))


def test_incompatible_layouts_are_refused(devices):
    model = load_model(HF_FIXTURES / "llama")
    src = _side(model, devices[:1], 1, page_size=4)
    dst = _side(model, devices[1:2], 1, page_size=8)
    with pytest.raises(ConfigError, match="KV layouts differ"):
        DeviceTransport().transfer(src.manager, [1], dst.manager, [1])
