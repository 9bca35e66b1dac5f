"""The paper's evaluation experiment: config, data cut, run kinds (a table), training, scoring,
communication, resume bookkeeping, and the summary report, one module each; `run_experiment` runs it."""

from fedmed_components.runs.experiment.config import RUN_KINDS, ExperimentConfig, load_config
from fedmed_components.runs.experiment.data import DataSource, PreparedSite, Sampling, prepare_site, sentence_documents, split_source
from fedmed_components.runs.experiment.kinds import KINDS
from fedmed_components.runs.experiment.plots import PLOTS
from fedmed_components.runs.experiment.report import write_report
from fedmed_components.runs.experiment.resume import read_results
from fedmed_components.runs.experiment.runner import run_experiment
from fedmed_components.runs.experiment.scoring import pool_scores

__all__ = [
    "KINDS",
    "PLOTS",
    "RUN_KINDS",
    "DataSource",
    "ExperimentConfig",
    "PreparedSite",
    "Sampling",
    "load_config",
    "pool_scores",
    "prepare_site",
    "read_results",
    "run_experiment",
    "sentence_documents",
    "split_source",
    "write_report",
]
