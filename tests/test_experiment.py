"""`fedmed experiment`: config, data cut, pooled scores, and a miniature experiment end to end."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from fedmed_components.data.document import Document, Entity, InputError, Relation
from fedmed_components.runs.experiment import PLOTS, DataSource, Sampling, load_config, pool_scores, prepare_site, sentence_documents

ROOT = Path(__file__).resolve().parents[1]


def test_sentence_documents_keep_offsets_and_relations():
    text = "No fever today. Pain in the left knee is severe.\n"
    pain, knee = text.index("Pain"), text.index("left knee")
    doc = Document(
        "n1",
        text,
        entities=[
            Entity("T1", "problem", [(text.index("fever"), text.index("fever") + 5)], "fever"),
            Entity("T2", "problem", [(pain, pain + 4)], "Pain"),
            Entity("T3", "bodyloc", [(knee, knee + 9)], "left knee"),
        ],
        relations=[Relation("hasAttr", "T2", "T3")],
    )
    sents = sentence_documents(doc)
    assert [s.id for s in sents] == ["n1#s000", "n1#s001"]
    for s in sents:
        for ent in s.entities:
            assert "".join(s.text[a:b] for a, b in ent.spans) == ent.text
    assert [e.id for e in sents[0].entities] == ["T1"] and sents[0].relations == []
    assert [(r.head, r.tail) for r in sents[1].relations] == [("T2", "T3")]


def test_packed_ner_runs_cut_notes_into_runs_of_sentences_and_reach_the_sites_job(tmp_path, exported_job):
    from fedmed_components.flare.job import JobSpec
    from fedmed_components.runs.experiment import config as config_module

    doc = Document("n1", "One fever. Two cough. Three rash.", entities=[Entity("T1", "problem", [(15, 20)], "cough")])
    runs = sentence_documents(doc, size=2)
    assert [(d.id, d.text) for d in runs] == [("n1#w000", "One fever. Two cough."), ("n1#w001", "Three rash.")]
    assert runs[0].entities[0].spans == [(15, 20)] and runs[1].entities == []

    source = DataSource(name="a", synthetic_style="case_report", synthetic_docs=6)
    site = prepare_site(source, Sampling(max_val_sentences=4), tmp_path / "data", sentences_per_document=3)
    assert all("#w" in d.id for d in site.read("train")) and len(site.read("val")) <= 2  # a limit of 4 sentences: 2 runs of 3
    with pytest.raises(InputError, match=r"prepared with other settings \(sentences_per_document: 3 -> None\)"):
        prepare_site(source, Sampling(max_val_sentences=4), tmp_path / "data")
    with pytest.raises(InputError, match=r"sampling.max_val_sentences: 4 -> 5"):  # the setting that differs is named
        prepare_site(source, Sampling(max_val_sentences=5), tmp_path / "data", sentences_per_document=3)

    config = tmp_path / "exp.yaml"
    config.write_text(
        "model: tiny\nner_sentences: 4\nruns: [fed_medlora]\nsites: [{name: a, synthetic_style: case_report}, {name: b, synthetic_style: case_report}]\n"
    )
    client = (exported_job(load_config(config), "fed_medlora") / "app" / "config" / "config_fed_client.json").read_text()
    assert "--ner-sentences 4" in client
    assert "--ner-sentences" not in JobSpec().site_args()  # 1, the default: the committed jobs carry no flag
    config.write_text(config.read_text().replace("ner_sentences: 4", "ner_sentences: 0"))
    with pytest.raises(InputError, match="exp.yaml:2: ner_sentences must be a positive integer"):
        load_config(config)
    assert config_module.ExperimentConfig().ner_sentences == 1


def test_test_split_is_held_out_by_note_and_deterministic(tmp_path):
    source = DataSource(name="general_medicine", synthetic_style="general_medicine", synthetic_docs=10)
    sampling = Sampling(seed=3, test_fraction=0.3, val_fraction=0.2, max_train_sentences=30)
    site = prepare_site(source, sampling, tmp_path / "a")
    notes = {part: {d.id.split("#")[0] for d in site.read(part)} for part in ("train", "val", "test")}
    assert notes["test"] and not notes["test"] & (notes["train"] | notes["val"])
    assert len(site.read("train")) == 30
    again = prepare_site(source, sampling, tmp_path / "b")
    assert [d.to_dict() for d in again.read("test")] == [d.to_dict() for d in site.read("test")]
    with pytest.raises(InputError, match="other settings"):
        prepare_site(source, Sampling(seed=4), tmp_path / "a")


def test_pooled_scores_sum_counts_and_skip_unscored_relations():
    def score(tp, fp, fn, rel):
        m = {"precision": 0, "recall": 0, "f1": 0, "tp": tp, "fp": fp, "fn": fn}
        return {
            "documents": 1,
            "entities": {"strict": m, "lenient": m},
            "relations": {"strict": m, "lenient": m} if rel else None,
            "parse_failures": 1,
        }

    pooled = pool_scores([score(3, 1, 0, True), score(1, 1, 4, False)])
    assert (pooled["entities"]["strict"]["tp"], pooled["entities"]["strict"]["fp"], pooled["entities"]["strict"]["fn"]) == (4, 2, 4)
    assert pooled["entities"]["strict"]["f1"] == pytest.approx(2 * (4 / 6) * (4 / 8) / (4 / 6 + 4 / 8))
    assert pooled["relations"]["strict"]["tp"] == 3  # only the site that annotates relations
    assert pool_scores([score(1, 0, 0, False)])["relations"] is None


def test_config_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: tiny\nlocal_stepz: 3\nsites: [{name: a, synthetic_style: case_report, synthetic_docs: 2}]\n")
    with pytest.raises(InputError, match=r"bad.yaml:3: .*local_stepz"):
        load_config(bad)
    bad.write_text("name: x\nsites: [{name: a, synthetic_style: case_report}]\nruns: [zero_shot, fedavg]\n")
    with pytest.raises(InputError, match=r"bad.yaml:3: unknown run"):
        load_config(bad)
    site = "sites: [{name: a, synthetic_style: case_report, synthetic_docs: 2}]\n"
    for setting, says in (
        ("rounds: three", r"bad.yaml:2: rounds: expected an integer, not 'three'"),
        ("lr: fast", r"bad.yaml:2: lr: expected a number"),
        ("server_lrs: [1, x]", r"bad.yaml:2: server_lrs: expected a number"),
        ("f1_every_round: yes please", r"bad.yaml:2: f1_every_round: expected true or false"),
        ("sampling: {seed: 1.5}", r"bad.yaml:2: seed: expected an integer"),
        ("modifier_none_biases: [1, 2]", r"bad.yaml:2: modifier_none_biases must list 0"),
        ("modifier_none_biases: [0, -1]", r"bad.yaml:2: modifier_none_biases must list 0"),
        ("modifier_none_biases: [0, 1]\nprompt_style: paper", r"bad.yaml:2: modifier_none_biases needs JSON modifier answers"),
    ):
        bad.write_text(f"name: x\n{setting}\n{site}")
        with pytest.raises(InputError, match=says):
            load_config(bad)
    # YAML 1.1 reads 1e-5 (no dot) as a string; a number field takes it as the number it is
    bad.write_text(f"name: x\nlr: 1e-5\ndp_delta: 1e-6\nlocal_steps: null\n{site}")
    cfg = load_config(bad)
    assert cfg.lr == 1e-5 and cfg.dp_delta == 1e-6 and cfg.local_steps is None


def test_relative_paths_and_mapping_files_resolve_from_the_config_folder(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "mine.yaml").write_text("entities: {Disease: problem}\n")
    config = folder / "exp.yaml"
    config.write_text("sites:\n  - {name: a, path: notes_a, mapping: mine.yaml}\n  - {name: b, path: notes_b, mapping: kiwi}\n")
    cfg = load_config(config)
    assert cfg.sites[0].path == str((folder / "notes_a").resolve())
    assert cfg.sites[0].mapping == str((folder / "mine.yaml").resolve())
    assert cfg.sites[1].mapping == "kiwi"  # a built-in name stays a name


def test_default_config_names_the_real_corpora():
    cfg = load_config(ROOT / "experiments" / "default.yaml")
    assert [s.name for s in cfg.sites] == ["general_medicine", "discharge_summary", "maccrobat"]
    assert cfg.external.name == "phee" and cfg.external.mapping == "phee"
    assert all(Path(s.path).is_absolute() and "shared/data" in s.path for s in cfg.sites)
    ids = cfg.run_ids()
    for required in (
        "zero_shot",
        "single_general_medicine",
        "single_discharge_summary",
        "single_maccrobat",
        "centralised",
        "fed_medlora",
        "fed_medlora_plus",
        "new_site_federated_20_s2",
    ):
        assert required in ids


@pytest.fixture
def exported_job(tmp_path, monkeypatch):
    """`exported_job(cfg, run_id)`: the job folder train_federated exports for a run of two
    sites a and b, the simulator replaced by a stop right after the export."""
    from fedmed_components.runs.experiment import training

    class Exported(Exception):
        pass

    def stop_after_export(job_dir, *args, **kwargs):
        raise Exported(job_dir)

    monkeypatch.setattr("fedmed_components.flare.job.run_simulator", stop_after_export)
    sites = [type("Site", (), {"name": n})() for n in ("a", "b")]

    def export(cfg, run_id) -> Path:
        with pytest.raises(Exported) as raised:
            training.train_federated(cfg, run_id, sites, tmp_path / "data", tmp_path / run_id)
        return Path(str(raised.value))

    return export


def test_schedule_round_config_is_the_default_with_the_papers_restart_alone():
    from fedmed_components.runs.experiment.resume import _settings_of

    default = load_config(ROOT / "experiments" / "default.yaml")
    restart = load_config(ROOT / "experiments" / "schedule_round.yaml")
    assert restart.schedule == "round" and default.schedule == "run" and restart.run_ids() == ["fed_medlora_plus"]
    made_with = {k: v for k, v in _settings_of("fed_medlora_plus", default.to_dict()).items() if k != "schedule"}
    assert made_with == {k: v for k, v in _settings_of("fed_medlora_plus", restart.to_dict()).items() if k != "schedule"}


def test_precision_bf16_config_is_the_default_with_bf16_alone():
    from fedmed_components.runs.experiment.resume import _settings_of

    default = load_config(ROOT / "experiments" / "default.yaml")
    bf16 = load_config(ROOT / "experiments" / "precision_bf16.yaml")
    assert bf16.precision == "bf16" and default.precision == "auto" and bf16.run_ids() == ["fed_medlora_plus", "fed_medlora"]
    for run_id in bf16.run_ids():
        made_with = {k: v for k, v in _settings_of(run_id, default.to_dict()).items() if k != "precision"}
        assert made_with == {k: v for k, v in _settings_of(run_id, bf16.to_dict()).items() if k != "precision"}


def test_batch2_config_is_the_default_at_batch_2_with_as_many_examples():
    from fedmed_components.runs.experiment.resume import _settings_of

    default = load_config(ROOT / "experiments" / "default.yaml")
    batch2 = load_config(ROOT / "experiments" / "batch2.yaml")
    assert (batch2.batch_size, batch2.local_steps) == (
        2,
        180,
    ) and batch2.local_steps * batch2.batch_size == default.local_steps * default.batch_size
    assert "single_general_medicine" in batch2.run_ids() and "centralised" in batch2.run_ids()
    differing = ("batch_size", "local_steps")
    made_with = {k: v for k, v in _settings_of("centralised", default.to_dict()).items() if k not in differing}
    assert made_with == {k: v for k, v in _settings_of("centralised", batch2.to_dict()).items() if k not in differing}


def test_fed_avgm_makes_a_run_per_server_lr_and_its_job_steps_at_that_lr(tmp_path, exported_job):
    from fedmed_components.runs.experiment import config as config_module

    config = tmp_path / "exp.yaml"
    config.write_text(
        "model: tiny\nserver_lrs: [2, 0.5]\nserver_momentum: 0.3\nruns: [fed_medlora, fed_avgm]\n"
        "sites: [{name: a, synthetic_style: case_report}, {name: b, synthetic_style: case_report}]\n"
    )
    cfg = load_config(config)
    assert cfg.run_ids() == ["fed_medlora", "fed_avgm_lr2", "fed_avgm_lr0p5"]
    assert [config_module.kind_of(r) for r in cfg.run_ids()] == ["fed_medlora", "fed_avgm", "fed_avgm"]
    assert config_module.job_settings(cfg, "fed_avgm_lr0p5") == {"algorithm": "fed_avgm", "server_lr": 0.5, "server_beta1": 0.3}
    assert config_module.job_settings(cfg, "fed_medlora") == {"algorithm": "fed_medlora", "loss_source": "sites"}
    with pytest.raises(ValueError, match="fed_avgm_lr3"):
        config_module.job_settings(cfg, "fed_avgm_lr3")  # not one of this config's server lrs

    server = json.loads((exported_job(cfg, "fed_avgm_lr2") / "app" / "config" / "config_fed_server.json").read_text())
    optimiser = next(c["args"] for c in server["components"] if c.get("args", {}).get("rule") == "fedavgm")
    assert optimiser["lr"] == 2 and optimiser["beta1"] == 0.3

    config.write_text(config.read_text().replace("[2, 0.5]", "[0]"))
    with pytest.raises(InputError, match=r"exp.yaml:2: server_lrs"):
        load_config(config)


def test_site_batch_runs_train_the_same_examples_in_more_smaller_steps(tmp_path, exported_job):
    from fedmed_components.runs.experiment import config as config_module
    from fedmed_components.runs.experiment.tables import path_steps

    config = tmp_path / "exp.yaml"
    config.write_text(
        "model: tiny\nlocal_steps: 45\nbatch_size: 8\nsite_batch_sizes: [2, 4]\nruns: [fed_medlora_plus, fed_medlora_plus_site_batch]\n"
        "sites: [{name: a, synthetic_style: case_report}, {name: b, synthetic_style: case_report}]\n"
    )
    cfg = load_config(config)
    assert cfg.run_ids() == ["fed_medlora_plus", "fed_medlora_plus_site_batch_b2", "fed_medlora_plus_site_batch_b4"]
    # 45 steps x 8 = 360 examples a round at every site, whatever its batch
    assert config_module.job_settings(cfg, "fed_medlora_plus_site_batch_b2") == {
        "algorithm": "fed_medlora_plus",
        "batch_size": 2,
        "local_steps": 180,
    }
    assert config_module.job_settings(cfg, "fed_medlora_plus_site_batch_b4")["local_steps"] == 90
    client = (exported_job(cfg, "fed_medlora_plus_site_batch_b4") / "app" / "config" / "config_fed_client.json").read_text()
    assert "--batch-size 4" in client and "--local-steps 90" in client
    # the global adapter's path counts the run's own local steps, not the config's
    result = {"kind": "federated", "job": {"local_steps": 90}, "rounds": [{"round": 0}, {"round": 1}]}
    assert [steps for steps, _ in path_steps(result, 45)] == [90, 180]

    config.write_text(config.read_text().replace("[2, 4]", "[2, 7]"))
    with pytest.raises(InputError, match=r"exp.yaml:4: site_batch_sizes: site batch 7 does not divide a round's 360 examples"):
        load_config(config)
    config.write_text(config.read_text().replace("local_steps: 45\n", ""))
    with pytest.raises(InputError, match=r"site_batch_sizes: a site batch needs local_steps"):
        load_config(config)


def _default_of(aggregator: str, argument: str):
    import inspect

    from fedmed_components.flare import aggregators

    return inspect.signature(getattr(aggregators, aggregator)).parameters[argument].default


def test_server_optimisers_fedprox_and_flexlora_are_runs_whose_jobs_carry_their_setting(tmp_path, exported_job):
    from fedmed_components.runs.experiment import config as config_module

    config = tmp_path / "exp.yaml"
    config.write_text(
        "model: tiny\nfed_adam_lrs: [0.003, 0.01]\nfed_yogi_lrs: [0.01]\nprox_mus: [0.1]\nsite_ranks: {a: 4, b: 8}\n"
        "temperatures: [0.05]\nruns: [fed_adam, fed_yogi, fed_prox, fed_flexlora, fed_medlora_plus_temperature]\n"
        "sites: [{name: a, synthetic_style: case_report}, {name: b, synthetic_style: case_report}]\n"
    )
    cfg = load_config(config)
    assert cfg.run_ids() == [
        "fed_adam_lr0p003",
        "fed_adam_lr0p01",
        "fed_yogi_lr0p01",
        "fed_prox_mu0p1",
        "fed_flexlora",
        "fed_medlora_plus_temperature_t0p05",
    ]
    kinds = ["fed_adam", "fed_adam", "fed_yogi", "fed_prox", "fed_flexlora", "fed_medlora_plus_temperature"]
    assert [config_module.kind_of(r) for r in cfg.run_ids()] == kinds
    assert config_module.job_settings(cfg, "fed_adam_lr0p003") == {"algorithm": "fed_adam", "server_lr": 0.003}
    assert config_module.job_settings(cfg, "fed_prox_mu0p1") == {"algorithm": "fed_prox", "prox_mu": 0.1}
    assert config_module.job_settings(cfg, "fed_flexlora") == {
        "algorithm": "fed_exact_lora",
        "site_overrides": {"a": {"rank": "4"}, "b": {"rank": "8"}},
    }

    server = json.loads((exported_job(cfg, "fed_yogi_lr0p01") / "app" / "config" / "config_fed_server.json").read_text())
    optimiser = next(c["args"] for c in server["components"] if c.get("args", {}).get("rule") == "fedyogi")
    # FLARE leaves out arguments equal to the constructor's default: beta1 is the rule's own 0.9, not fed_avgm's momentum
    assert optimiser["lr"] == 0.01 and optimiser.get("beta1", _default_of("ServerOptimizerAggregator", "beta1")) == 0.9
    assert "--prox-mu 0.1" in (exported_job(cfg, "fed_prox_mu0p1") / "app" / "config" / "config_fed_client.json").read_text()
    server = json.loads((exported_job(cfg, "fed_medlora_plus_temperature_t0p05") / "app" / "config" / "config_fed_server.json").read_text())
    assert any(c.get("args", {}).get("temperature") == 0.05 for c in server["components"])
    flex = exported_job(cfg, "fed_flexlora")
    ranks = {site: (flex / f"app_{site}" / "config" / "config_fed_client.json").read_text() for site in ("a", "b")}
    assert "--rank 4" in ranks["a"] and "--rank 8" in ranks["b"]

    for setting, says in (
        ("site_ranks: {a: 4, b: 8}", "site_ranks: {a: 4, c: 8}"),
        ("site_ranks: {a: 4, b: 8}", "site_ranks: {a: 0}"),
        ("prox_mus: [0.1]", "prox_mus: []"),
    ):
        broken = tmp_path / "broken.yaml"
        broken.write_text(config.read_text().replace(setting, says))
        with pytest.raises(InputError, match=r"broken.yaml:\d: " + says.split(":")[0]):
            load_config(broken)
    broken.write_text(config.read_text().replace("site_ranks: {a: 4, b: 8}\n", ""))
    with pytest.raises(InputError, match="fed_flexlora needs site_ranks"):
        load_config(broken)


def test_fed_medlora_dp_makes_a_run_per_epsilon_and_its_sites_spend_that_budget(tmp_path, exported_job):
    from fedmed_components.runs.experiment import config as config_module

    config = tmp_path / "exp.yaml"
    config.write_text(
        "model: tiny\ndp_epsilons: [8, 2.5]\ndp_clip: 0.5\ndp_record: note\nruns: [fed_medlora, fed_medlora_dp]\n"
        "sites: [{name: a, synthetic_style: case_report}, {name: b, synthetic_style: case_report}]\n"
    )
    cfg = load_config(config)
    assert cfg.run_ids() == ["fed_medlora", "fed_medlora_dp_eps8", "fed_medlora_dp_eps2p5"]
    assert config_module.kind_of("fed_medlora_dp_eps2p5") == "fed_medlora_dp"
    assert config_module.job_settings(cfg, "fed_medlora_dp_eps8") == {"algorithm": "fed_medlora"}
    assert config_module.dp_sgd_of(cfg, "fed_medlora_dp_eps2p5") == "epsilon=2.5,clip=0.5,delta=1e-05,record=note"
    assert config_module.dp_sgd_of(cfg, "fed_medlora") == ""
    with pytest.raises(ValueError, match="fed_medlora_dp_eps3"):
        config_module.dp_sgd_of(cfg, "fed_medlora_dp_eps3")  # not one of this config's budgets

    client = (exported_job(cfg, "fed_medlora_dp_eps2p5") / "app" / "config" / "config_fed_client.json").read_text()
    assert "--dp-sgd epsilon=2.5,clip=0.5,delta=1e-05,record=note" in client

    broken = tmp_path / "broken.yaml"
    for good, bad, says in (
        ("dp_epsilons: [8, 2.5]", "dp_epsilons: [0]", r"broken.yaml:2: dp_epsilons"),
        ("dp_record: note", "dp_record: patient", r"broken.yaml:4: .*record"),
        ("dp_clip: 0.5", "dp_clip: -1", r"broken.yaml:3: .*clip"),
    ):
        broken.write_text(config.read_text().replace(good, bad))
        with pytest.raises(InputError, match=says):
            load_config(broken)


def test_new_site_run_resumes_a_cut_federation_before_starting_from_its_adapter(tmp_path, monkeypatch):
    """A re-training cut after round 0 leaves store/global (round 0's adapter): a new-site
    run must finish that federation first, not fine-tune from the round-0 adapter."""
    from types import SimpleNamespace

    from fedmed_components.runs.experiment import kinds

    config = tmp_path / "exp.yaml"
    config.write_text(
        "model: tiny\nrounds: 3\nruns: [fed_medlora_plus, new_site]\nnew_site_from: fed_medlora_plus\n"
        "sites: [{name: a, synthetic_style: case_report}]\nexternal: {name: x, synthetic_style: case_report}\n"
    )
    cfg = load_config(config)
    source = tmp_path / "runs" / "fed_medlora_plus"
    (source / "store" / "global").mkdir(parents=True)
    exp = SimpleNamespace(cfg=cfg, external=None, sites=["site"], work=tmp_path, run_dir=lambda run_id: tmp_path / "runs" / run_id)

    class Trained(Exception):
        pass

    class Loaded(Exception):
        pass

    def train(cfg, run_id, sites, data_root, run_dir):
        raise Trained(run_id, run_dir)

    def load(folder):
        raise Loaded(folder)

    monkeypatch.setattr(kinds, "train_federated", train)
    monkeypatch.setattr("fedmed_components.model.modeling.load_adapter_folder", load)
    for last_round, expected in ((None, Trained), (0, Trained), (1, Trained), (2, Loaded)):
        state = {} if last_round is None else {"last_round": last_round, "history": []}
        (source / "store" / "state.json").write_text(json.dumps(state))
        with pytest.raises(expected) as raised:
            kinds.new_site_run(exp, "new_site_federated_5_s1", tmp_path / "runs" / "new_site_federated_5_s1")
        if expected is Trained:
            assert raised.value.args == ("fed_medlora_plus", source), last_round
        else:
            assert raised.value.args == (source / "store" / "global",)


# ------------------------------------------------------------------ the whole harness


def _table_rows(markdown: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], {row[0]: row for row in cells[2:]}


def _f1(counts: dict) -> float:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


@pytest.mark.slow
def test_mini_experiment_end_to_end(tmp_path, capsys):
    """Tiny model, synthetic notes, 2 sites, 2 rounds: zero-shot, single sites, Fed-MedLoRA
    through the FLARE simulator, new-site adaptation; then a re-run skips everything
    and a deleted run is made again from its saved rounds. About 3-4 min on 2 CPU cores."""
    import torch

    from fedmed_components.cli import main
    from fedmed_components.model.modeling import load_adapter_folder

    raw = yaml.safe_load((ROOT / "experiments" / "mini.yaml").read_text())
    raw.update(
        runs=["zero_shot", "single", "centralised", "fed_medlora", "new_site"],
        max_new_tokens=48,
        site_adapter_f1=True,
        personalised=True,
        modifier_none_biases=[0, 2],
        prompt_style="compact",  # the none bias needs JSON modifier answers
    )
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(raw))
    out, work = tmp_path / "results", tmp_path / "work"
    assert main(["experiment", str(config), "--out", str(out), "--work", str(work)]) == 0

    cfg = load_config(config)
    run_ids = cfg.run_ids()
    assert run_ids == [
        "zero_shot",
        "single_discharge_summary",
        "single_general_medicine",
        "centralised",
        "fed_medlora",
        "new_site_scratch_4",
        "new_site_federated_4",
    ]
    for name in [f"{r}.json" for r in run_ids] + ["experiment.json", "summary.md", *PLOTS]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for plot in PLOTS:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {r: json.loads((out / f"{r}.json").read_text()) for r in run_ids}
    assert all(r["status"] == "done" for r in results.values())
    assert all(r["resolved_precision"] in ("fp32", "bf16") for r in results.values())
    assert not list(out.glob("*.jsonl")), "predictions (note text) belong in the work folder"

    # The federated run went through the simulator and its persistor's rounds.
    fed = results["fed_medlora"]
    assert [h["round"] for h in fed["rounds"]] == [0, 1]
    assert all(h["val_loss"] is not None and h["val_entity_strict_f1"] is not None for h in fed["rounds"])
    state, _, _ = load_adapter_folder(work / "runs" / "fed_medlora" / "store" / "global")
    assert fed["communication"]["adapter_bytes_per_round_per_site"] == sum(t.numel() * t.element_size() for t in state.values())
    assert fed["communication"]["adapter_bytes_per_round_per_site"] < fed["communication"]["full_model_bytes_per_round_per_site"]
    assert results["new_site_federated_4"]["started_from"] == "fed_medlora"
    # site_adapter_f1: every site kept its own adapter of every round (not the mean) and it was scored
    for h in fed["rounds"]:
        assert set(h["site_adapters"]) == {s.name for s in cfg.sites}
        assert all(own["val_main_strict_f1"] is not None and "val_relation_strict_f1" in own for own in h["site_adapters"].values())
    site_last, _, _ = load_adapter_folder(work / "runs" / "fed_medlora" / "site_adapters" / "general_medicine" / "round_001")
    assert site_last.keys() == state.keys() and any(not torch.equal(site_last[k], state[k]) for k in state)
    # personalised: each site's own last adapter scored on its own test notes (and own validation every round)
    own = fed["personalised"]
    assert own["round"] == 1 and set(own["scores"]["sites"]) == {s.name for s in cfg.sites}
    for name, score in own["scores"]["sites"].items():
        assert set(score["per_note"]) == set(fed["scores"]["sites"][name]["per_note"])  # the same notes as the global's
    assert own["intervals"]["pooled"]["main_entities"]["strict"]["low"] <= own["scores"]["pooled"]["main_entities"]["strict"]["f1"]
    assert all("val_main_strict_f1" in h["personalised"] for h in fed["rounds"])
    heading = "Personalised: each site's own last adapter on its own notes (paired over the same test notes)"
    _, own_rows = _table_rows((out / "summary.md").read_text(), heading)
    assert set(own_rows) == {"fed_medlora"}
    assert own_rows["fed_medlora"][2].startswith(f"{own['scores']['pooled']['main_entities']['strict']['f1']:.3f} [")

    # modifier_none_biases: the final adapter's modifiers asked again at each bias on
    # validation, and test scored at the bias chosen there, on the same entities
    for run_id in ("centralised", "fed_medlora", "single_general_medicine"):
        calibrated = results[run_id]["calibrated_modifiers"]
        val = {float(b): f for b, f in calibrated["validation_relation_strict_f1"].items()}
        assert set(val) == {0.0, 2.0} and calibrated["chosen_bias"] == max(val, key=lambda b: (val[b], -b))
        assert val[0.0] == results[run_id]["rounds"][-1]["val_relation_strict_f1"]  # bias 0 is the plain validation score
        for name, score in calibrated["scores"]["sites"].items():
            plain = results[run_id]["scores"]["sites"][name]
            assert score["main_entities"] == plain["main_entities"] and set(score["per_note"]) == set(plain["per_note"])
    _, calibrated_table = _table_rows(
        (out / "summary.md").read_text(), "Modifiers at the none bias chosen on validation (paired over the same test notes)"
    )
    assert set(calibrated_table) == {"single_discharge_summary", "single_general_medicine", "centralised", "fed_medlora"}
    cal = results["centralised"]["calibrated_modifiers"]
    assert calibrated_table["centralised"][2] == f"{cal['chosen_bias']:g}"
    assert calibrated_table["centralised"][4].startswith(f"{cal['scores']['pooled']['relations']['strict']['f1']:.3f} [")

    # Every number of the main table equals the one recomputed from the run's JSON counts.
    summary = (out / "summary.md").read_text()
    header, rows = _table_rows(summary, "In-domain and external test")
    assert set(rows) == {"zero_shot", "single_discharge_summary", "single_general_medicine", "centralised", "fed_medlora"}

    def pooled_f1(scores, group, mode):
        return _f1({k: sum(s[group][mode][k] for s in scores["sites"].values()) for k in ("tp", "fp", "fn")})

    for run_id, row in rows.items():
        result = results[run_id]
        scores, ci = result["scores"], result["intervals"]
        expected = [
            f"{pooled_f1(scores, g, m):.3f} [{ci['pooled'][g][m]['low']:.3f}, {ci['pooled'][g][m]['high']:.3f}]"
            for g, m in (
                ("main_entities", "strict"),
                ("main_entities", "lenient"),
                ("entities", "strict"),
                ("relations", "strict"),
                ("relations", "lenient"),
            )
        ]
        expected += [f"{_f1(scores['sites'][s.name]['main_entities']['strict']):.3f}" for s in cfg.sites]
        ext = ci["external"]["main_entities"]["strict"]
        expected += [
            f"{_f1(scores['external']['main_entities']['strict']):.3f} [{ext['low']:.3f}, {ext['high']:.3f}]",
            f"{_f1(scores['external']['main_entities']['lenient']):.3f}",
        ]
        assert row[2:] == expected, run_id
        # the per-note counts behind the intervals sum to the scores
        for site, score in scores["sites"].items():
            for group in ("entities", "main_entities", "relations"):
                summed = [sum(n[group]["strict"][i] for n in score["per_note"].values()) for i in range(3)]
                assert summed == [score[group]["strict"][k] for k in ("tp", "fp", "fn")], (run_id, site, group)
        assert (
            ci["pooled"]["main_entities"]["strict"]["low"]
            <= ci["pooled"]["main_entities"]["strict"]["estimate"]
            <= ci["pooled"]["main_entities"]["strict"]["high"]
        )
    _, diffs = _table_rows(summary, "Differences (paired bootstrap over the same test notes)")
    gap = pooled_f1(results["fed_medlora"]["scores"], "main_entities", "strict") - pooled_f1(
        results["centralised"]["scores"], "main_entities", "strict"
    )
    assert diffs["Fed-MedLoRA - centralised"][1].startswith(f"{gap:+.3f} [")
    # centralised is the learning curve: validation F1 at every checkpoint, examples counted
    assert [h["examples"] for h in results["centralised"]["rounds"]] == [
        (i + 1) * 2 * cfg.local_steps * cfg.batch_size for i in range(cfg.rounds)
    ]
    assert all("val_entity_strict_f1" in h for h in results["centralised"]["rounds"])
    _, own = _table_rows(summary, "Validation F1 of each site's own adapter before the mean (strict main entities / modifiers)")
    last = fed["rounds"][-1]
    assert own["fed_medlora"][2:] == [
        f"{v['val_main_strict_f1']:.3f} / {v['val_relation_strict_f1']:.3f}"
        for v in (last, *(last["site_adapters"][s.name] for s in cfg.sites))
    ]
    _, comm = _table_rows(summary, "Communication (fp32 adapter vs full-model FedAvg in fp32, upload per site)")
    assert comm["fed_medlora"][3] == f"{fed['communication']['adapter_bytes_per_round_per_site'] / 1e6:.3f}"
    _, new_site = _table_rows(summary, "New-site adaptation (case_report test split)")
    assert new_site["from fed_medlora"][3] == f"{_f1(results['new_site_federated_4']['scores']['external']['main_entities']['strict']):.3f}"

    # Re-running skips every finished run and leaves its JSON untouched.
    stamps = {r: (out / f"{r}.json").stat().st_mtime_ns for r in run_ids}
    capsys.readouterr()
    assert main(["experiment", str(config), "--out", str(out), "--work", str(work)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == len(run_ids)
    assert {r: (out / f"{r}.json").stat().st_mtime_ns for r in run_ids} == stamps

    # A run whose JSON is gone is made again from its saved rounds (no retraining).
    (out / "single_general_medicine.json").unlink()
    assert main(["experiment", str(config), "--out", str(out), "--work", str(work), "--only", "single_general_medicine"]) == 0
    again = json.loads((out / "single_general_medicine.json").read_text())
    assert again["rounds"] == results["single_general_medicine"]["rounds"]
    assert again["scores"] == results["single_general_medicine"]["scores"]
    assert re.search(r"\[1/1\] single_general_medicine: done", capsys.readouterr().out)

    # On a fresh machine the federation's JSON is there but its adapters are not (never
    # committed): the new-site run trains that federation again, and leaves its JSON alone.
    shutil.rmtree(work / "runs" / "fed_medlora" / "store")
    (out / "new_site_federated_4.json").unlink()
    fed_stamp = (out / "fed_medlora.json").stat().st_mtime_ns
    assert main(["experiment", str(config), "--out", str(out), "--work", str(work), "--only", "new_site_federated_4"]) == 0
    assert "global adapter of fed_medlora is not in" in capsys.readouterr().out
    assert (work / "runs" / "fed_medlora" / "store" / "global").is_dir()
    assert json.loads((out / "new_site_federated_4.json").read_text())["started_from"] == "fed_medlora"
    assert (out / "fed_medlora.json").stat().st_mtime_ns == fed_stamp


def test_results_folder_refuses_a_changed_config(tmp_path):
    """Resuming a results folder with other settings would mix runs of two configs in one
    table: refused before anything runs, naming runs and settings. Moved data folders and
    operational settings (timeouts, generation batch size) do not count, and a setting only
    one run depends on (BERT's) re-makes just that run once its JSON is deleted."""
    from dataclasses import replace

    from fedmed_components.runs.experiment import run_experiment
    from fedmed_components.runs.experiment.resume import _refuse_other_config

    cfg = load_config(ROOT / "experiments" / "mini.yaml")
    out = tmp_path / "results"
    out.mkdir()
    made = {k: v for k, v in cfg.to_dict().items() if k not in ("sites", "external", "runs")}
    for run_id in ("zero_shot", "bert"):
        (out / f"{run_id}.json").write_text(json.dumps({"config": made}))
    changed = replace(cfg, rounds=cfg.rounds + 1, sampling=replace(cfg.sampling, max_test_sentences=999))
    with pytest.raises(
        InputError,
        match=r"results: 2 finished run\(s\) here were made with other settings \(zero_shot: rounds, sampling; bert: rounds, sampling\)",
    ):
        run_experiment(changed, out, work=tmp_path / "work")
    assert not (tmp_path / "work").exists(), "refused before any data was cut"

    ids = cfg.run_ids()
    moved = replace(
        cfg, simulator_timeout=1.0, generation_batch_size=3, sites=[replace(s, path=str(tmp_path / "elsewhere")) for s in cfg.sites]
    )
    _refuse_other_config(moved, out, ids)  # the same experiment: resumable
    bert_changed = replace(cfg, bert_lr=cfg.bert_lr * 3)
    with pytest.raises(InputError, match=r"1 finished run\(s\) .*\(bert: bert_lr\)"):
        _refuse_other_config(bert_changed, out, ids)
    (out / "bert.json").unlink()
    _refuse_other_config(bert_changed, out, ids)  # only BERT is made again


def test_saved_rounds_of_other_settings_are_not_resumed(tmp_path, capsys):
    from dataclasses import replace

    from fedmed_components.runs.experiment.resume import _start_over_if_changed

    cfg = load_config(ROOT / "experiments" / "mini.yaml")
    run_dir = tmp_path / "bert"
    _start_over_if_changed("bert", cfg, run_dir)
    (run_dir / "round_000").mkdir()
    _start_over_if_changed("bert", replace(cfg, simulator_timeout=5.0), run_dir)  # operational: kept
    assert (run_dir / "round_000").is_dir()
    _start_over_if_changed("bert", replace(cfg, bert_local_steps=99), run_dir)
    assert not (run_dir / "round_000").exists() and (run_dir / "settings.json").exists()
    assert "bert: its saved rounds were made with other settings (bert_local_steps): starting it over" in capsys.readouterr().out


def test_equal_steps_table_lines_federated_rounds_up_with_centralised_steps():
    from fedmed_components.runs.experiment.tables import equal_steps_rows, path_steps

    def rec(main, rel, **kw):
        return {"val_main_strict_f1": main, "val_relation_strict_f1": rel, **kw}

    results = {
        # centralised checkpoints every 10 steps; a federation's round is 20 local steps per site
        "centralised": {"kind": "centralised", "rounds": [rec(0.1 * k, 0.0, round=k - 1, steps=10) for k in range(1, 5)]},
        "fed": {"kind": "federated", "rounds": [rec(0.5, 0.1, round=0), rec(0.7, 0.2, round=1)]},
        "single_a": {"kind": "single_site", "rounds": [rec(0.3, 0.0, round=0, steps=20), rec(0.6, 0.0, round=1, steps=20)]},
        "bert": {"kind": "bert", "rounds": [rec(0.9, 0.9, round=0, steps=20)]},
        "zero_shot": {"kind": "zero_shot"},
    }
    assert [s for s, _ in path_steps(results["centralised"], 20)] == [10, 20, 30, 40]
    assert [s for s, _ in path_steps(results["fed"], 20)] == [20, 40]
    header, rows = equal_steps_rows(results, 20)
    assert header == ["run", "20 steps: main / modifier", "40 steps: main / modifier"]
    assert rows == [
        ["centralised", "0.200 / 0.000", "0.400 / 0.000"],
        ["fed", "0.500 / 0.100", "0.700 / 0.200"],
        ["single_a", "0.300 / 0.000", "0.600 / 0.000"],
    ]
    # no federated curve (or unknown local steps): nothing to line up, no table
    assert equal_steps_rows({k: v for k, v in results.items() if k != "fed"}, 20)[1] == []
    assert equal_steps_rows(results, None)[1] == []


def test_site_adapter_table_sets_each_sites_own_adapter_beside_the_mean():
    from fedmed_components.runs.experiment.tables import site_adapter_rows

    def rec(main, rel):
        return {"val_main_strict_f1": main, "val_relation_strict_f1": rel}

    own = {"a": rec(0.5, 0.25), "b": rec(0.4, 0.0)}
    results = {
        "fed": {"kind": "federated", "rounds": [{"round": 0, **rec(0.45, 0.0), "site_adapters": own}, {"round": 1, **rec(0.6, 0.1)}]},
        "fed_partial": {"kind": "federated", "rounds": [{"round": 2, **rec(0.7, 0.2), "site_adapters": {"b": rec(0.3, 0.05)}}]},
        "centralised": {"kind": "centralised", "rounds": [{"round": 0, **rec(0.9, 0.9), "site_adapters": own}]},
    }
    header, rows = site_adapter_rows(results, ["a", "b"])
    assert header == ["run", "round", "global (the mean)", "a's own", "b's own"]
    assert rows == [
        ["fed", "0", "0.450 / 0.000", "0.500 / 0.250", "0.400 / 0.000"],
        ["fed_partial", "2", "0.700 / 0.200", "-", "0.300 / 0.050"],
    ]
    assert site_adapter_rows({"fed": {"kind": "federated", "rounds": [rec(0.1, 0.0) | {"round": 0}]}}, ["a"])[1] == []


def _counted_run(kind: str, tp_per_note: list[int], val_loss: float, val_f1: float) -> dict:
    """A finished run whose pooled main-entity strict F1 comes from per-note counts
    (10 gold entities a note, every prediction a true positive)."""
    per_note = {f"n{i}": {"main_entities": {"strict": [tp, 0, 10 - tp]}} for i, tp in enumerate(tp_per_note)}
    tp = sum(tp_per_note)
    pooled = {"main_entities": {"strict": {"f1": 2 * tp / (2 * tp + 10 * len(tp_per_note) - tp)}}}
    rounds = [{"round": 0, "val_loss": val_loss, "val_main_strict_f1": val_f1}]
    return {"kind": kind, "status": "done", "rounds": rounds, "scores": {"sites": {"a": {"per_note": per_note}}, "pooled": pooled}}


def test_goals_judge_the_paper_methods_and_ablations_are_read_against_the_method_they_change():
    from fedmed_components.runs.experiment.comparisons import ablation_rows, goals

    results = {
        "fed_medlora": _counted_run("federated", [8] * 30, 0.22, 0.35),
        "fed_medlora_plus": _counted_run("federated", [8] * 29 + [7], 0.21, 0.36),
        "single_a": _counted_run("single_site", [5] * 30, 0.30, 0.20),
        "fed_avgm_lr2": _counted_run("federated", [3] * 30, 0.20, 0.30),  # below the single site
        "fed_medlora_plus_server": _counted_run("federated", [9] * 30, 0.19, 0.40),
        "fed_medlora_dp_eps3": _counted_run("federated", [2] * 30, 0.40, 0.05),
    }
    results["fed_medlora_dp_eps3"]["config"] = {"dp_delta": 1e-5}
    results["fed_medlora_dp_eps3"]["rounds"][-1]["dp_sgd"] = {"a": {"epsilon": 2.991}, "b": {"epsilon": 2.995}}
    lines = goals(results)
    single = next(line for line in lines if "above every single site" in line)
    assert "(fed_medlora, fed_medlora_plus)" in single and "lowest fed_medlora_plus" in single and single.endswith("(met)")
    assert not any(run in line for line in lines for run in ("fed_avgm_lr2", "fed_medlora_plus_server", "fed_medlora_dp_eps3"))

    results["centralised"] = _counted_run("centralised", [9] * 30, 0.15, 0.36)  # within 5%: val F1 >= 0.342
    header, rows = ablation_rows(results)
    assert header[0] == "run" and all(len(row) == len(header) for row in rows)
    by_run = {row[0]: row for row in rows}
    assert list(by_run) == ["fed_medlora", "fed_medlora_plus", "fed_avgm_lr2", "fed_medlora_plus_server", "fed_medlora_dp_eps3"]
    # precision, val loss, val F1, chosen, rounds to 0.95x, test main strict / lenient, modifiers strict / lenient, gap
    assert by_run["fed_medlora"][1:] == ["-", "not recorded", "0.220", "0.350", "-", "1", "0.889", "n/a", "n/a", "n/a", "-"]
    assert by_run["fed_avgm_lr2"][1:8] == ["fed_medlora", "not recorded", "0.200", "0.300", "-", "not in 1", "0.462"]
    assert by_run["fed_medlora_dp_eps3"][1] == "fed_medlora + DP-SGD, epsilon spent <= 3.00 (delta 1e-05)"
    assert by_run["fed_medlora_dp_eps3"][5] == "-"  # an epsilon is a budget, never chosen on validation
    assert by_run["fed_medlora_plus_server"][1] == "fed_medlora_plus"
    # every note moved the same way: the paired interval is one point, of the right sign
    assert by_run["fed_avgm_lr2"][-1] == "-0.427 [-0.427, -0.427]"
    assert by_run["fed_medlora_plus_server"][-1].startswith("+")
    # an ablation whose base has not finished has no row
    assert [row[0] for row in ablation_rows({k: v for k, v in results.items() if k != "fed_medlora"})[1]] == [
        "fed_medlora_plus",
        "fed_medlora_plus_server",
    ]


def test_ablation_rows_say_what_each_run_changes_and_which_swept_value_validation_chose():
    from fedmed_components.runs.experiment.comparisons import ablation_rows, chosen_on_validation

    results = {
        "fed_medlora": _counted_run("federated", [8] * 30, 0.22, 0.35) | {"resolved_precision": "bf16"},
        # validation prefers lr 0.003 (higher val F1) although its test F1 is the lower one
        "fed_adam_lr0p01": _counted_run("federated", [9] * 30, 0.18, 0.30) | {"job": {"algorithm": "fed_adam", "server_lr": 0.01}},
        "fed_adam_lr0p003": _counted_run("federated", [7] * 30, 0.25, 0.34) | {"job": {"algorithm": "fed_adam", "server_lr": 0.003}},
        # a tie on validation F1 goes to the lower validation loss
        "fed_yogi_lr0p01": _counted_run("federated", [8] * 30, 0.20, 0.33) | {"job": {"algorithm": "fed_yogi", "server_lr": 0.01}},
        "fed_yogi_lr0p003": _counted_run("federated", [8] * 30, 0.19, 0.33) | {"job": {"algorithm": "fed_yogi", "server_lr": 0.003}},
        "fed_prox_mu0p01": _counted_run("federated", [8] * 30, 0.22, 0.35) | {"job": {"algorithm": "fed_prox", "prox_mu": 0.01}},
        "fed_flexlora": _counted_run("federated", [8] * 30, 0.22, 0.35)
        | {"job": {"algorithm": "fed_exact_lora", "site_overrides": {"a": {"rank": "8"}, "b": {"rank": "4"}}}},
        "fed_avgm_lr2": _counted_run("federated", [8] * 30, 0.22, 0.35) | {"server_lr": 2, "server_momentum": 0.0},
        # two privacy budgets: a budget is set by the hospitals, never chosen on validation
        "fed_medlora_dp_eps8": _counted_run("federated", [2] * 30, 1.3, 0.05) | {"job": {"algorithm": "fed_medlora"}},
        "fed_medlora_dp_eps3": _counted_run("federated", [1] * 30, 1.5, 0.01) | {"job": {"algorithm": "fed_medlora"}},
    }
    assert chosen_on_validation(results) == {
        "fed_adam_lr0p01": False,
        "fed_adam_lr0p003": True,
        "fed_yogi_lr0p01": False,
        "fed_yogi_lr0p003": True,
    }  # one value (fed_prox, fed_avgm): no choice made; none among the DP budgets
    header, rows = ablation_rows(results)
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_run["fed_medlora"]["precision"] == "bf16" and by_run["fed_adam_lr0p01"]["precision"] == "not recorded"
    assert by_run["fed_adam_lr0p01"]["changes"] == "fed_medlora + FedAdam, server lr 0.01"
    assert by_run["fed_adam_lr0p003"]["chosen on validation"] == "yes" and by_run["fed_adam_lr0p01"]["chosen on validation"] == "no"
    assert (
        by_run["fed_prox_mu0p01"]["changes"] == "fed_medlora + FedProx mu 0.01" and by_run["fed_prox_mu0p01"]["chosen on validation"] == "-"
    )
    assert by_run["fed_flexlora"]["changes"] == "fed_medlora + exact aggregation of B A, site ranks a 8, b 4"
    assert by_run["fed_avgm_lr2"]["changes"] == "fed_medlora + FedAvgM, server lr 2, momentum 0"
    assert by_run["fed_adam_lr0p01"]["test main strict: run - base [95% CI]"].startswith("+0.")


def test_personalised_rows_pair_each_sites_own_adapter_with_the_global_and_centralised_on_the_same_notes():
    from fedmed_components.runs.experiment.comparisons import personalised_rows

    fed = _counted_run("federated", [6] * 20, 0.2, 0.5)
    fed["rounds"][0] |= {"val_relation_strict_f1": 0.04, "personalised": {"val_main_strict_f1": 0.55, "val_relation_strict_f1": 0.29}}
    own = _counted_run("federated", [7] * 20, 0.2, 0.5)  # every note: one more true positive than the global
    fed["personalised"] = {"round": 0, "scores": own["scores"]}
    results = {
        "fed_medlora_plus": fed,
        "fed_medlora": _counted_run("federated", [6] * 20, 0.2, 0.5),  # not scored personalised: no row
        "centralised": _counted_run("centralised", [9] * 20, 0.1, 0.6),
    }
    header, rows = personalised_rows(results)
    assert [row[0] for row in rows] == ["fed_medlora_plus"]
    row = dict(zip(header, rows[0]))
    assert row["val main / modifier strict F1, last round: global -> own"] == "0.500 / 0.040 -> 0.550 / 0.290"
    assert row["test main strict F1, own adapters [95% CI]"] == f"{2 * 7 / (2 * 7 + 3):.3f}"  # no interval made: F1 alone
    gain = 2 * 7 / 17 - 2 * 6 / 16  # every note moved the same way: the interval is one point
    assert header[3] == "own - global" and rows[0][3] == f"{gain:+.3f} [{gain:+.3f}, {gain:+.3f}]"
    assert header[4] == "own - centralised" and rows[0][4].startswith("-0.")
    assert header[6] == "own - global" and rows[0][6] == "n/a"  # no modifiers scored here
    # without a centralised run the column says so
    assert personalised_rows({"fed_medlora_plus": fed})[1][0][4] == "n/a"


def _with_modifiers(run: dict, tp_per_note: list[int]) -> dict:
    """`run` with modifier counts too (10 gold links a note, every prediction right)."""
    for counts, tp in zip(run["scores"]["sites"]["a"]["per_note"].values(), tp_per_note):
        counts["relations"] = {"strict": [tp, 0, 10 - tp], "lenient": [tp, 0, 10 - tp]}
    tp = sum(tp_per_note)
    run["scores"]["pooled"]["relations"] = {m: {"f1": 2 * tp / (2 * tp + 10 * len(tp_per_note) - tp)} for m in ("strict", "lenient")}
    return run


def test_calibrated_rows_set_the_chosen_none_bias_against_bias_0_on_the_same_notes():
    from fedmed_components.runs.experiment.comparisons import calibrated_rows, goals

    central = _with_modifiers(_counted_run("centralised", [9] * 20, 0.1, 0.6), [2] * 20)
    again = _with_modifiers(_counted_run("centralised", [9] * 20, 0.1, 0.6), [6] * 20)  # the same entities, more links
    central["calibrated_modifiers"] = {
        "validation_relation_strict_f1": {"0": 0.2, "1.5": 0.45, "3": 0.4},
        "chosen_bias": 1.5,
        "scores": again["scores"],
    }
    results = {"centralised": central, "fed_medlora": _with_modifiers(_counted_run("federated", [6] * 20, 0.2, 0.5), [1] * 20)}
    header, rows = calibrated_rows(results)
    assert [row[0] for row in rows] == ["centralised"]  # only runs scored with the biases
    row = dict(zip(header, rows[0]))
    assert row["val modifier strict F1 per none bias"] == "0: 0.200, 1.5: 0.450, 3: 0.400" and row["chosen"] == "1.5"
    before, after = 2 * 2 / (2 * 2 + 8), 2 * 6 / (2 * 6 + 4)
    assert row["test modifier strict F1, bias 0 [95% CI]"] == f"{before:.3f}"
    assert row["at the chosen bias [95% CI]"] == f"{after:.3f}"
    gain = after - before  # every note moved the same way: a one-point interval
    assert row["chosen - 0"] == f"{gain:+.3f} [{gain:+.3f}, {gain:+.3f}]"
    goal = next(line for line in goals(results) if "modifier strict F1 >= 0.5" in line)
    assert goal == f"- centralised modifier strict F1 >= 0.5: {before:.3f}; at the none bias validation chose, {after:.3f} (met)"


def test_new_site_starts_are_compared_per_seed_over_the_same_external_notes():
    from fedmed_components.runs.experiment.comparisons import new_site_difference_rows

    def new_site(start, shots, seed, tp_per_note):
        per_note = {f"n{i}": {"main_entities": {"strict": [tp, 0, 10 - tp]}} for i, tp in enumerate(tp_per_note)}
        return {
            "kind": "new_site",
            "status": "done",
            "start": start,
            "shots": shots,
            "shot_seed": seed,
            "scores": {"external": {"per_note": per_note}},
        }

    results = {
        "new_site_scratch_5_s0": new_site("scratch", 5, 0, [2] * 20),
        "new_site_federated_5_s0": new_site("federated", 5, 0, [8] * 20),
        "new_site_federated_10_s0": new_site("federated", 10, 0, [8] * 20),  # its scratch run is not made yet
    }
    header, rows = new_site_difference_rows(results)
    # F1 2*8/(16+2) - 2*2/(4+8) on every note alike: a one-point interval
    assert rows == [["5", "0", "+0.556 [+0.556, +0.556]"]] and len(header) == 3
