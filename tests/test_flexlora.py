"""Per-site LoRA ranks in one job (FlexLoRA): the server averages the layer products B_k·A_k
(fed_exact_lora) and each site takes the global update truncated by SVD to its own rank,
reporting what the truncation lost."""

import json
import re

import numpy as np
import pytest
import torch

from fedmed_components.federation.lora_keys import is_lora_A
from fedmed_components.model.modeling import LoraSettings, load_adapter_folder
from fedmed_components.model.site import SiteConfig, SiteRuntime


def _runtime(rank: int) -> SiteRuntime:
    return SiteRuntime(SiteConfig(model="tiny", quantize="none", lora=LoraSettings(r=rank, alpha=32)), site_name=f"rank-{rank}")


def _products(state: dict, scaling: float) -> dict[str, np.ndarray]:
    """layer -> scaling * B @ A, in float64 numpy."""
    out = {}
    for key, a in state.items():
        if is_lora_A(key):
            b = state[key.replace("lora_A", "lora_B")]
            out[key.replace(".lora_A", "")] = scaling * b.double().numpy() @ a.double().numpy()
    return out


def test_truncation_is_the_best_low_rank_product_and_its_residual_shrinks_with_the_rank(tiny_model_path):
    torch.manual_seed(0)
    global_state = {k: torch.randn_like(v) for k, v in _runtime(16).adapter_state().items()}  # a rank-16 global update
    wanted = _products(global_state, 32 / 16)
    residuals = {}
    for rank in (2, 4, 8):
        site = _runtime(rank)
        truncation = site.set_adapter(global_state)
        got = _products(site.adapter_state(), 32 / rank)
        # independent: numpy's SVD of each layer, keep the top `rank` singular values
        kept_sq = lost_sq = 0.0
        for layer, m in wanted.items():
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            best = (u[:, :rank] * s[:rank]) @ vt[:rank]
            np.testing.assert_allclose(got[layer], best, rtol=1e-4, atol=1e-5 * np.abs(m).max())
            kept_sq += float((s**2).sum())
            lost_sq += float((s[rank:] ** 2).sum())
        assert truncation["global_rank"] == 16 and truncation["rank"] == rank
        assert truncation["residual"] == pytest.approx((lost_sq / kept_sq) ** 0.5, rel=1e-6)
        residuals[rank] = truncation["residual"]
    assert residuals[2] > residuals[4] > residuals[8] > 0
    same = _runtime(16)
    assert same.set_adapter(global_state) is None  # the site's own rank: loaded as is, nothing truncated
    assert all(torch.equal(same.adapter_state()[k], global_state[k]) for k in global_state)


@pytest.mark.slow
def test_sites_at_ranks_4_8_16_train_one_job(tmp_path, write_site_data, tiny_model_path, no_leftovers):
    from fedmed_components.flare.job import JobSpec, run_simulator
    from fedmed_components.flare.recipe import export_job

    sites = ["site-1", "site-2", "site-3"]
    data = write_site_data(sites)
    spec = JobSpec(
        name="flex",
        algorithm="fed_exact_lora",
        model="tiny",
        sites=sites,
        num_rounds=2,
        min_clients=3,
        local_steps=2,
        batch_size=2,
        max_length=160,
        rank=16,
        alpha=32,
        quantize="none",
        data=str(data),
        output_dir=str(tmp_path / "store"),
        cross_site_eval=False,
        site_overrides={"site-1": {"rank": "4"}, "site-2": {"rank": "8"}},
    )
    workspace = run_simulator(export_job(spec, tmp_path / "jobs"), tmp_path / "ws", sites, timeout=600)
    state, lora, _ = load_adapter_folder(tmp_path / "store" / "global")
    assert {v.shape[0] for k, v in state.items() if is_lora_A(k)} == {16}  # the global adapter keeps the job's rank
    log = "\n".join(p.read_text() for p in workspace.rglob("log.txt"))
    for site, rank in (("site-1", 4), ("site-2", 8)):
        assert re.search(rf"{site} round 1: global adapter rank 16 truncated to rank {rank} by SVD", log), site
    assert "site-3 round 1: global adapter rank" not in log  # rank 16: nothing to truncate
    residuals = {site: float(re.search(rf"{site} round 1: .*truncated .* residual ([\d.e-]+)", log).group(1)) for site in sites[:2]}
    assert residuals["site-1"] > residuals["site-2"] > 0  # the same global update, cut to 4 and to 8
    history = json.loads((tmp_path / "store" / "state.json").read_text())["history"]
    assert all(h["rejected"] == [] for h in history) and all(sorted(h["sites"]) == sites for h in history)
    assert "exact aggregation: residual" in log
