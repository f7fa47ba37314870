"""`place()` and `jaxpd place`: plans checked in the simulator, heterogeneous plans that beat
every single device kind, one-line reasons when the SLOs are out of reach, and the CLI's JSON,
exit codes and deployment YAML."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from jaxpd.cli import main
from jaxpd.config import parse_config
from jaxpd.model.presets import get_preset
from jaxpd.placement.catalog import load_catalog, parse_inventory
from jaxpd.placement.place import Slo, Workload, place, verify
from jaxpd.placement.placer import Option, Plan
from jaxpd.placement.workload import dump_trace, generate

LLAMA8B = get_preset("llama3-8b").replace(dtype="bfloat16")
CATALOG = load_catalog()


def pools(**counts: int):
    """An inventory at catalog list prices: pools(h100=8, l4=4) (pool name = catalog key prefix)."""
    keys = {"h100": "h100-sxm", "a100": "a100-80gb", "l4": "l4", "v5e": "tpu-v5e",
            "v6e": "tpu-v6e"}
    data = {"pools": [{"name": name, "device": keys[name], "count": n} for name, n in counts.items()]}
    return parse_inventory(data, "<test>", CATALOG)


# The docs/placement.md scenario: Llama-3-8B chatbot at 100 req/s, TTFT 0.25 s / TPOT 30 ms p90.
MIXED = dict(h100=8, a100=16, l4=32)
CHAT_SLO = Slo(0.25, 0.03)


@pytest.fixture(scope="module")
def mixed_placement():
    # a 32k-request steady-state horizon (the CLI's is 64k), and no goodput search (the
    # replay below measures the written plan's): this fixture takes about 10 s
    return place(LLAMA8B, pools(**MIXED), Workload("chatbot"), 100.0, CHAT_SLO, candidates=2,
                 max_sim_requests=32_000, find_goodput=False)


def test_heterogeneous_plan_beats_every_single_kind(mixed_placement):
    best = mixed_placement.best
    assert best is not None and best.verified
    devices = {o.pool for o, _ in best.plan.choices}
    assert len(devices) == 2, best.plan.describe()  # prefill on one kind, decode on another
    assert mixed_placement.single_kind  # every kind that can serve alone was priced
    assert all(best.cost_per_hour < cost for cost in mixed_placement.single_kind.values())
    assert best.transport == "tcp"  # between pools: the tcp data plane, as the YAML says
    assert best.ttft <= CHAT_SLO.ttft and best.tpot <= CHAT_SLO.tpot and best.attainment >= 0.9


def test_the_chosen_plan_holds_on_fresh_arrivals(mixed_placement, tmp_path, capsys):
    """The plan, written as the YAML it deploys and replayed by `jaxpd simulate` on 20,000
    requests with a seed the placer did not use, meets the 90% target: verification ran to
    the steady state (the plan of the old short check met it for 43-58% there)."""
    from jaxpd.placement.deploy_yaml import plan_yaml

    by_name = {p.name: p for p in pools(**MIXED)}
    out = tmp_path / "deploy.yaml"
    out.write_text(plan_yaml(mixed_placement.best.plan, checkpoint=None, pools=by_name))
    code = main(["simulate", "--config", str(out), "--model", "llama3-8b", "--workload",
                 "chatbot", "--rate", "100", "--requests", "20000", "--seed", "99",
                 "--slo", "ttft_p90=0.25", "--slo", "tpot_p90=0.03", "--json"])
    assert code == 0
    replay = json.loads(capsys.readouterr().out)
    assert replay["attainment"] >= 0.9 and replay["meets_slo"], replay
    assert replay["ttft_p90"] <= 0.25 and replay["tpot_p90"] <= 0.03
    assert replay["goodput"] >= 100


def test_verify_adds_replicas_where_the_simulation_misses_and_drops_spare_ones():
    inventory = {p.name: p for p in pools(h100=8)}
    pre = Option("prefill", "h100", 1, 40.0, 11.06, "", 0, 0)
    dec = Option("decode", "h100", 1, 40.0, 11.06, "", 128, 300_000)
    reqs = generate("summarization", 30.0, 1500, seed=0)
    slo = Slo(1.0, 0.05)
    grown = verify(LLAMA8B, Plan(((pre, 1), (dec, 1))), inventory, reqs, slo)
    assert grown.verified and grown.plan.replicas("prefill") > 1
    assert any(note.startswith("+1 prefill") for note in grown.notes)
    shrunk = verify(LLAMA8B, Plan(((pre, 4), (dec, 3))), inventory, reqs, slo)
    assert shrunk.verified and shrunk.plan.devices < 7
    assert shrunk.cost_per_hour < shrunk.analytic_cost
    # headroom holds in the simulation too: prefill replicas busier than the limit gain one,
    # and none is dropped below it
    roomy = verify(LLAMA8B, shrunk.plan, inventory, reqs, slo, max_utilization=0.3)
    assert roomy.plan.replicas("prefill") > shrunk.plan.replicas("prefill")
    assert any("over --max-utilization 30%" in note for note in roomy.notes), roomy.notes


@pytest.mark.parametrize("slo, rate, inventory, start", [
    (Slo(0.002, 0.05), 1.0, dict(h100=8), "ttft_p90=0.002s is out of reach: the fastest prefill"),
    # the prefill alone fits 5 ms; the request path (router, gRPC) does not
    (Slo(0.005, 0.2), 1.0, dict(h100=8), "ttft_p90=0.005s is out of reach: the fastest prefill"),
    (Slo(1.0, 0.001), 1.0, dict(h100=8), "tpot_p90=0.001s is out of reach: the fastest decode"),
    (Slo(1.0, 0.1), 1000.0, dict(l4=2), "rate 1000 req/s is out of reach on this inventory"),
])
def test_unreachable_slos_say_which_and_the_best_figure(slo, rate, inventory, start):
    result = place(LLAMA8B, pools(**inventory), Workload("chatbot"), rate, slo, candidates=2,
                   sim_requests=500)
    assert result.best is None
    assert result.unreachable.startswith(start), result.unreachable
    assert "\n" not in result.unreachable


def test_a_model_that_fits_nowhere():
    seventy = get_preset("llama3-70b").replace(dtype="bfloat16")
    result = place(seventy, pools(l4=1), Workload("chatbot"), 1.0, Slo(1.0, 0.1))
    assert result.best is None and result.unreachable.startswith("no pool can hold the model")


def test_trace_workloads_are_rescaled_to_the_rate(tmp_path):
    path = tmp_path / "trace.jsonl"
    dump_trace(generate("code", 2.0, 400, seed=3), path)
    workload = Workload.from_trace(str(path))
    reqs = workload.requests(10.0, 1000)
    assert len(reqs) == 1000
    assert (len(reqs) - 1) / reqs[-1].arrival_s == pytest.approx(10.0, rel=0.05)
    assert [r.prompt_tokens for r in reqs[:400]] == [r.prompt_tokens for r in workload.trace]


# -- the CLI ---------------------------------------------------------------------------------------
def _inventory(tmp_path, text: str):
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return str(path)


def test_cli_json_and_deployment_yaml(tmp_path, capsys):
    inv = _inventory(tmp_path, "pools:\n  - {name: gpu, device: h100-sxm, count: 8}\n")
    out = tmp_path / "deploy.yaml"
    code = main(["place", "--inventory", inv, "--model", "llama3-8b", "--workload", "code",
                 "--rate", "10", "--slo", "ttft_p90=0.125", "--slo", "tpot_p90=0.2", "--json",
                 "--candidates", "2", "--out", str(out), "--plot", str(tmp_path / "plans.png")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (tmp_path / "plans.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # cost vs goodput
    for key in ("cost_per_hour", "prefill", "decode", "ttft_p90", "tpot_p90", "goodput",
                "slo_attainment", "candidates"):
        assert key in result
    assert result["ttft_p90"] <= 0.125 and result["tpot_p90"] <= 0.2
    assert result["slo_attainment"] >= 0.9 and result["goodput"] >= 10
    assert {"replicas", "groups"} <= set(result["prefill"])
    cfg = parse_config(yaml.safe_load(out.read_text()), str(out))
    written = lambda role: [(g.tp, g.replicas) for g in cfg.groups(role)]  # noqa: E731
    listed = lambda key: [(g["tp"], g["replicas"]) for g in result[key]["groups"]]  # noqa: E731
    if result["colocated"]:
        assert cfg.mode == "colocated" and written("colocated") == listed("prefill")
    else:
        assert written("prefill") == listed("prefill") and written("decode") == listed("decode")
        assert cfg.replicas("decode") == result["decode"]["replicas"]
        assert cfg.serving.transport == result["kv_transport"]  # the transport it priced
    assert cfg.model.checkpoint == "MODEL_CHECKPOINT_DIR"  # a preset: the user names the folder


def test_cli_unreachable_is_one_line_and_exit_1(tmp_path, capsys):
    inv = _inventory(tmp_path, "pools:\n  - {name: l4, device: l4, count: 2}\n")
    code = main(["place", "--inventory", inv, "--model", "llama3-8b", "--rate", "5",
                 "--slo", "ttft_p90=0.001", "--slo", "tpot_p90=0.1", "--json"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ttft_p90=0.001s is out of reach")


@pytest.mark.parametrize("inventory, flags, message", [
    ("pools:\n  - {name: a, device: h300, count: 2}\n", [],
     "pools[0].device: unknown device 'h300'"),
    ("pools:\n  - {name: a, device: l4, count: 0}\n", [], "pools[0].count"),
    ("pools:\n  - {name: a, device: l4, count: 2}\n", ["--model", "llama9"],
     "--model: 'llama9' is neither a preset"),
    ("pools:\n  - {name: a, device: l4, count: 2}\n", ["--workload", "nope.jsonl"],
     "--workload: 'nope.jsonl'"),
])
def test_cli_bad_input_exits_2_naming_the_key(tmp_path, capsys, inventory, flags, message):
    inv = _inventory(tmp_path, inventory)
    argv = ["place", "--inventory", inv, "--model", "llama3-8b", "--rate", "1",
            "--slo", "ttft_p90=1", "--slo", "tpot_p90=0.1", *flags]
    if "--model" in flags:
        argv[argv.index("--model") + 1:argv.index("--model") + 2] = []
        argv.remove("--model")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_slo_flags_are_checked(tmp_path):
    inv = _inventory(tmp_path, "pools:\n  - {name: a, device: l4, count: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "jaxpd.cli", "place", "--inventory", inv,
                           "--model", "llama3-8b", "--rate", "1", "--slo", "ttft=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "expected ttft_pNN=SECONDS" in proc.stderr
    assert main(["place", "--inventory", inv, "--model", "llama3-8b", "--rate", "1",
                 "--slo", "ttft_p90=1"]) == 2  # tpot missing


def test_mixed_vendor_plans_hand_kv_over_tcp():
    result = place(LLAMA8B, pools(v5e=16, v6e=8, l4=16), Workload("summarization"), 20.0,
                   Slo(2.0, 0.05), candidates=4, sim_requests=800)
    assert result.best is not None
    for c in result.candidates:
        kinds = {o.pool for o, _ in c.plan.choices}
        if len(kinds) == 2:
            assert c.transport == "tcp"


def test_simulate_replays_a_hand_written_cpu_config_and_names_what_is_missing(tmp_path, capsys):
    """`jaxpd simulate` on configs/local.yaml (no `accelerator`: priced by the CPU profile,
    the embedded model): the JSON the issue names; a placer YAML whose model is the
    placeholder needs --model, and says so (exit 2)."""
    code = main(["simulate", "--config", "configs/local.yaml", "--workload", "code", "--rate",
                 "1", "--requests", "300", "--slo", "ttft_p90=2", "--slo", "tpot_p90=0.5",
                 "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"attainment", "ttft_p90", "tpot_p90", "goodput"} <= set(out)
    assert 0 <= out["attainment"] <= 1 and out["goodput"] > 0 and out["requests"] == 300
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: {checkpoint: MODEL_CHECKPOINT_DIR}\nmode: colocated\n"
                    "prefill: {devices: [0], tp: 1, replicas: 1, accelerator: h100-sxm}\n")
    assert main(["simulate", "--config", str(plan), "--rate", "1"]) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.slow
def test_a_random_inventorys_plan_holds_when_its_yaml_is_replayed(tmp_path, capsys):
    """One of tools/check_placer.py's random cases (Llama-3-8B code completion at 50 req/s on
    a TPU v5e + H200 inventory): the placer's YAML, replayed by `jaxpd simulate` on 20,000
    requests with a seed the placer did not use, meets the SLO target (the tool runs 30 such
    cases; the chatbot headline is test_the_chosen_plan_holds_on_fresh_arrivals)."""
    pools_yaml = ("pools:\n  - {name: v5e, device: tpu-v5e, count: 8}\n"
                  "  - {name: h200, device: h200, count: 8}\n")
    ttft, tpot = 0.225, 0.15
    inventory = _inventory(tmp_path, pools_yaml)
    out = tmp_path / "deploy.yaml"
    slos = ["--slo", f"ttft_p90={ttft}", "--slo", f"tpot_p90={tpot}"]
    assert main(["place", "--inventory", inventory, "--model", "llama3-8b", "--workload",
                 "code", "--rate", "50", *slos, "--json", "--candidates", "2",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["simulate", "--config", str(out), "--model", "llama3-8b", "--workload", "code",
                 "--rate", "50", "--requests", "20000", "--seed", "424242", *slos,
                 "--json"]) == 0
    replay = json.loads(capsys.readouterr().out)
    assert replay["meets_slo"] and replay["attainment"] >= 0.9, replay
