"""Byzantine attacks that pass today's screening, in live FLARE jobs (simulator, tiny
model, CPU), against the robust aggregator (``RobustAggregator``, one job per rule).

One attack per round: an honest round, then the last site sends a random direction at
the norm of its own trained update, that update sign-flipped, that update scaled x3
(under the 10x norm bound), then the last two sites send the same crafted update
(``x_g - 2 mean`` of their honest updates). The weakest attack comes first, while the
honest sites' updates still agree most. Every site records what it received, trained and sent
(tests/fault_site.py --record), so each round's honest-only Fed-MedLoRA aggregate (the
attackers simply absent) and what plain Fed-MedLoRA would have made of the same updates
can be computed here. For each round: every update passes the screening (no rejection),
the server's global is exactly the rule applied to the recorded updates, and its
distance to the honest-only aggregate (relative to the honest step's norm) is below a
stated bound and below plain Fed-MedLoRA's; norm bounding is shown to stop only the
scaled update.

The job is the builder's fed_medlora job with a robust rule (``JobSpec.robust_rule``,
``fedmed job export --robust-rule``).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmed_components.data.document import write_jsonl
from fedmed_components.federation import aggregation, robust_aggregation
from fedmed_components.federation.update_validation import update_norm
from fedmed_components.flare.job import JobSpec, run_simulator
from fedmed_components.flare.recipe import export_job
from fedmed_components.model.modeling import load_adapter_folder

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROUNDS = ["none", "random", "sign_flip", "scale3", "collude"]  # fault_site.py kinds, one per round
# rule -> number of sites (breakdown point >= 2 colluders), aggregator args
RULES = {
    "median": (5, {"robust_rule": "median"}),  # tolerates f < 5/2
    "trimmed_mean": (7, {"robust_rule": "trimmed_mean", "trim_beta": 0.3}),  # floor(0.3 * 7) = 2 per side
    "norm_bounded": (5, {"robust_rule": "norm_bounded"}),  # clip: median norm of the round
}
# Per rule and round: (bound on |robust global - honest-only aggregate| / |honest step|,
# floor on plain Fed-MedLoRA's distance, which must also exceed the robust one). None:
# not asserted, the rule does not claim to stop that attack (see the end of the test).
# Measured on CPU (docs/robust_aggregation.md); the bounds leave about 30% or more.
BOUNDS = {
    "median": {"none": (0.3, None), "random": (0.3, 0.25), "sign_flip": (0.25, 0.3), "scale3": (0.45, 0.45), "collude": (0.65, 1.0)},
    "trimmed_mean": {"none": (0.2, None), "random": (0.18, 0.17), "sign_flip": (0.15, 0.22), "scale3": (0.32, 0.3), "collude": (0.4, 0.75)},
    "norm_bounded": {"none": (0.03, None), "random": None, "sign_flip": None, "scale3": (0.15, 0.45), "collude": None},
}


def site_names(k: int) -> list[str]:
    return [f"site-{i}" for i in range(1, k + 1)]


def write_site_data(root: Path, sites: list[str], docs_per_site: int = 16) -> Path:
    """IID sites: one synthetic note style, a disjoint slice of notes per site."""
    from fedmed_components.data.synth import demo_corpus

    ((_, docs),) = demo_corpus(n_sites=1, docs_per_site=docs_per_site * len(sites), seed=1).items()
    for i, site in enumerate(sites):
        mine = docs[i * docs_per_site : (i + 1) * docs_per_site]
        write_jsonl(mine[:-1], root / site / "train.jsonl")
        write_jsonl(mine[-1:], root / site / "val.jsonl")
    return root


def robust_job(tmp_path: Path, sites: list[str], aggregator_args: dict) -> Path:
    spec = JobSpec(
        **aggregator_args,
        name="robust",
        model="tiny",
        sites=sites,
        num_rounds=len(ROUNDS),
        min_clients=len(sites),
        local_steps=4,
        batch_size=32,
        max_length=128,
        learning_rate=1e-3,
        rank=4,
        alpha=8,
        quantize="none",
        tensorboard=False,
        data=str(write_site_data(tmp_path / "data", sites)),
        output_dir=str(tmp_path / "store"),
        train_timeout=300,
        extra_site_args=(
            f"--max-val-examples 4 --fault-site {sites[-1]} --faults {','.join(ROUNDS)}"
            f" --colluders {sites[-2]},{sites[-1]} --record {tmp_path / 'record'}"
        ),
    )
    job = export_job(spec, tmp_path / "jobs")
    custom = job / "app" / "custom"
    shutil.copyfile(custom / "fedmed_site.py", custom / "fedmed_site_real.py")
    shutil.copyfile(HERE / "fault_site.py", custom / "fedmed_site.py")
    (entry,) = [
        c for c in json.loads((job / "app" / "config" / "config_fed_server.json").read_text())["components"] if c["id"] == "aggregator"
    ]
    assert entry["path"] == "fedmed_components.flare.aggregators.RobustAggregator"
    return job


def recorded_round(folder: Path, sites: list[str]):
    """(global, {site: honest}, {site: sent}, {site: meta}) as the sites recorded them."""
    honest, sent, metas, global_state = {}, {}, {}, None
    for site in sites:
        tensors = load_file(str(folder / f"{site}.safetensors"))
        metas[site] = json.loads((folder / f"{site}.json").read_text())
        part = lambda prefix, tensors=tensors: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        received = part("global/")
        if global_state is None:
            global_state = received
        assert all(torch.equal(received[k], global_state[k]) for k in global_state), f"{site} got another global"
        honest[site], sent[site] = part("honest/"), part("sent/")
    return global_state, honest, sent, metas


@pytest.mark.parametrize("rule", list(RULES))
def test_robust_rule_holds_against_attacks_that_pass_the_screening(rule, tmp_path, tiny_model_path, no_leftovers):
    k, args = RULES[rule]
    sites = site_names(k)
    job = robust_job(tmp_path, sites, args)
    workspace = run_simulator(job, tmp_path / "ws", sites, timeout=900)
    server_log = next(workspace.rglob("server/**/log.txt")).read_text(errors="replace")
    store = tmp_path / "store"
    history = json.loads((store / "state.json").read_text())["history"]
    assert [h["current_round"] for h in history] == list(range(len(ROUNDS)))
    options = {"beta": args["trim_beta"]} if rule == "trimmed_mean" else {}
    measured = {}
    for rnd, kind in enumerate(ROUNDS):
        global_state, honest, sent, metas = recorded_round(tmp_path / "record" / f"round_{rnd:03d}", sites)
        attackers = [s for s in sites if metas[s]["attacker"]]
        assert attackers == ({"none": [], "collude": sites[-2:]}.get(kind, sites[-1:])), (kind, attackers)
        # every update passed today's screening and was aggregated
        assert history[rnd]["sites"] == sites and history[rnd]["rejected"] == [], (kind, history[rnd])
        assert history[rnd]["robust"]["rule"] == rule
        assert f"round {rnd} robust aggregation {rule}" in server_log
        tokens = {s: metas[s]["num_supervised_tokens"] for s in sites}
        good = [s for s in sites if s not in attackers]
        honest_only = aggregation.fed_medlora([honest[s] for s in good], [tokens[s] for s in good])
        plain = aggregation.fed_medlora([sent[s] for s in sites], [tokens[s] for s in sites])
        live, _, _ = load_adapter_folder(store / f"round_{rnd:03d}")
        # the server's global is exactly the rule over the updates the sites sent
        updates = [aggregation.adapter_difference(sent[s], global_state) for s in sites]
        offline = robust_aggregation.state_from_update(
            global_state, robust_aggregation.robust_aggregate(updates, rule, weights=[tokens[s] for s in sites], **options)
        )
        for key in offline:
            torch.testing.assert_close(live[key], offline[key], atol=1e-6, rtol=0)
        step = update_norm(honest_only, global_state)
        measured[kind] = {
            "robust": update_norm(live, honest_only) / step,
            "plain": update_norm(plain, honest_only) / step,
            "honest_step_norm": step,
        }
    print(
        f"\n{rule} ({k} sites, attacker {sites[-1]}, colluders {sites[-2]},{sites[-1]}): |global - honest-only aggregate| / |honest step|"
    )
    for kind, m in measured.items():
        print(f"  {kind:10s} robust {m['robust']:.3f}  plain Fed-MedLoRA {m['plain']:.3f}  (honest step norm {m['honest_step_norm']:.3f})")
    for kind, m in measured.items():
        if BOUNDS[rule][kind] is None:
            continue
        bound, plain_floor = BOUNDS[rule][kind]
        if kind == "none":  # no attacker: plain is the honest aggregate; robust pays its price
            assert m["plain"] < 1e-5 and m["robust"] < bound, (rule, kind, m)
        else:
            assert m["plain"] > plain_floor, (rule, kind, m)  # the attack does pull the mean
            assert m["robust"] < bound and m["robust"] < m["plain"], (rule, kind, m)
    if rule == "norm_bounded":
        # The documented limit: an update at an honest norm is not clipped, so a wrong
        # direction pulls as hard as in the plain mean; the two colluders are clipped to
        # the median norm, which helps but leaves the global far from the honest one.
        for kind in ("sign_flip", "random"):
            assert abs(measured[kind]["robust"] - measured[kind]["plain"]) < 0.05, (kind, measured[kind])
        assert 0.6 < measured["collude"]["robust"] < measured["collude"]["plain"], measured["collude"]
