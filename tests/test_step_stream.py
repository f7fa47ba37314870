"""The multi-host step stream on real loopback sockets: frames, the handshake, liveness, and
where a host learns its place (flags or the LeaderWorkerSet environment)."""

from __future__ import annotations

import socket
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from jaxpd.errors import ConfigError, JaxpdError
from jaxpd.serving import multihost
from jaxpd.serving.launcher import free_port_pair

SECRET = "s3cret"


def test_frames_round_trip_every_carried_dtype():
    a, b = socket.socketpair()
    arrays = {"tokens": np.arange(12, dtype=np.int32).reshape(3, 4),
              "keys": np.array([[1, 2]], np.uint32), "t": np.array([0.5], np.float32),
              "kv": np.ones((2, 3), ml_dtypes.bfloat16), "empty": np.zeros((0, 5), np.float32),
              "flag": np.array(True)}
    multihost._send(a, multihost.encode("step", {"shape": ["step", 1, 16, 2, 0]}, arrays))
    op, static, got = multihost.receive(b)
    assert op == "step" and static == {"shape": ["step", 1, 16, 2, 0]}
    assert list(got) == list(arrays)
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value)


def test_frames_refuse_what_they_do_not_carry():
    with pytest.raises(TypeError, match="object"):
        multihost.encode("x", {}, {"o": np.array([None], object)})
    a, b = socket.socketpair()
    a.sendall(multihost._LENGTH.pack(1 << 40))  # a header no leader would send
    with pytest.raises(ValueError, match="header"):
        multihost.receive(b)
    a.sendall(b'\x00' * 7 + bytes([len(h := b'{"op":"x","static":{},"arrays":[["a","object",[1]]]}')]) + h)
    with pytest.raises(KeyError):  # never np.dtype("object") from the wire
        multihost.receive(b)
    a.close()
    with pytest.raises(multihost.HostLost):
        multihost.receive(b)


def _group(hosts: int = 2, index: int = 0) -> multihost.HostGroup:
    return multihost.HostGroup(hosts, index, f"127.0.0.1:{free_port_pair('127.0.0.1')}")


def test_followers_replay_the_leaders_ops_in_order_and_stop_with_it():
    group = _group(hosts=3)
    lost: list[str] = []
    leader = multihost.StepLeader(group, SECRET, liveness_s=5.0, on_lost=lost.append)
    seen = {1: [], 2: []}
    codes = {}

    def follower(index: int) -> None:
        member = multihost.HostGroup(3, index, group.coordinator)
        sock = multihost.connect(member, SECRET, timeout_s=10)
        codes[index] = multihost.follow(
            sock, lambda op, static, arrays: seen[index].append((op, static, arrays["x"].sum())),
            index)
    threads = [threading.Thread(target=follower, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    leader.accept(timeout_s=10)
    for i in range(5):
        leader.publish("step", {"i": i}, {"x": np.full(4, i, np.int32)})
    # far more than the socket buffers hold (KV writes are): sends block, never EAGAIN
    leader.publish("big", {}, {"x": np.ones(8 << 20, np.int32)})
    # per-host arrays: each follower gets its own share
    leader.publish("share", {}, {}, per_host=lambda i: {"x": np.full(3, i, np.int32)})
    leader.close()
    for t in threads:
        t.join(10)
    expected = [("step", {"i": i}, 4 * i) for i in range(5)] + [("big", {}, 8 << 20)]
    assert seen == {1: expected + [("share", {}, 3)], 2: expected + [("share", {}, 6)]}
    assert codes == {1: 0, 2: 0}
    assert leader.frames == 8 and not lost  # seven ops and the stop; a stop is no loss


def test_a_wrong_secret_is_refused_and_a_missing_host_times_out():
    group = _group()
    leader = multihost.StepLeader(group, SECRET, liveness_s=5.0, on_lost=lambda why: None)
    intruder = multihost.connect(multihost.HostGroup(2, 1, group.coordinator), "guess", 5)
    with pytest.raises(JaxpdError, match=r"hosts \[1\] of this replica did not connect"):
        leader.accept(timeout_s=1.5)
    intruder.settimeout(2)
    assert intruder.recv(1) == b""  # the leader hung up on it


def _leader_with_follower(liveness_s: float):
    group = _group()
    lost: list[str] = []
    leader = multihost.StepLeader(group, SECRET, liveness_s=liveness_s, on_lost=lost.append)
    sock = multihost.connect(multihost.HostGroup(2, 1, group.coordinator), SECRET, 5)
    leader.accept(timeout_s=5)
    return leader, sock, lost


def _wait(predicate, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_the_leader_hears_of_a_dead_follower_at_once_and_of_a_silent_one_after_liveness():
    leader, sock, lost = _leader_with_follower(liveness_s=30.0)
    sock.close()  # died: the connection closes
    assert _wait(lambda: lost) and "host 1 of this replica is gone" in lost[0]
    with pytest.raises(multihost.HostLost):
        for _ in range(100):  # the kernel may take a write or two before it refuses
            leader.publish("step", {}, {"x": np.zeros(1 << 16, np.int32)})

    started = time.monotonic()
    leader, sock, lost = _leader_with_follower(liveness_s=0.8)  # connected, never beats
    assert _wait(lambda: lost) and "no heartbeat for 0.8 s" in lost[0]
    assert time.monotonic() - started < 5
    sock.close()


def test_a_follower_whose_leader_dies_exits_to_be_restarted():
    leader, sock, _ = _leader_with_follower(liveness_s=30.0)
    result = {}
    t = threading.Thread(target=lambda: result.update(code=multihost.follow(
        sock, lambda *a: None, 1)))
    t.start()
    for conn in leader._followers.values():  # the leader process is gone: no stop frame
        conn.shutdown(socket.SHUT_RDWR)
    t.join(10)
    assert result == {"code": 3}


def test_where_a_host_learns_its_place():
    assert multihost.resolve(1, "decode", None, None, 8476, env={}) is None
    with pytest.raises(ConfigError, match="--host-index 1: decode.hosts is 1"):
        multihost.resolve(1, "decode", 1, None, 8476, env={})
    g = multihost.resolve(2, "decode", 1, "10.0.0.5:9000", 8476, env={})
    assert g == multihost.HostGroup(2, 1, "10.0.0.5:9000") and not g.leader
    assert g.steps_address == ("10.0.0.5", 9001)
    lws = {"LWS_LEADER_ADDRESS": "jaxpd-decode-0.jaxpd-decode.ns", "LWS_WORKER_INDEX": "0",
           "LWS_GROUP_SIZE": "4"}
    g = multihost.resolve(4, "prefill", None, None, 8476, env=lws)
    assert g == multihost.HostGroup(4, 0, "jaxpd-decode-0.jaxpd-decode.ns:8476") and g.leader
    with pytest.raises(ConfigError, match="LWS_GROUP_SIZE=4 but prefill.hosts is 2"):
        multihost.resolve(2, "prefill", None, None, 8476, env=lws)
    with pytest.raises(ConfigError, match="--host-index 0..1"):
        multihost.resolve(2, "prefill", None, "h:1", 8476, env={})
    with pytest.raises(ConfigError, match="--coordinator HOST:PORT"):
        multihost.resolve(2, "prefill", 0, None, 8476, env={})
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        multihost.resolve(2, "prefill", 0, "nohost", 8476, env={})
    with pytest.raises(ConfigError, match="--host-index 2: prefill.hosts is 2"):
        multihost.resolve(2, "prefill", 2, "h:1", 8476, env={})
