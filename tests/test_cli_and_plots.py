"""The demo's state-space part and the diagnostic plots run and write their files
(the LLM and image parts of the demo are tested in test_eval_cli / test_diffusion_toy)."""
import numpy as np

import ppl_scaling as pps
from ppl_scaling import plots
from ppl_scaling.demo import state_space_demo
from ppl_scaling.ssm import LinearGaussian


def test_state_space_demo_matches_kalman_and_writes_its_plot(tmp_path):
    numbers = state_space_demo(tmp_path)
    assert (tmp_path / "state_space_filter.png").stat().st_size > 10_000
    assert numbers["max_mean_error"] < 0.3 and abs(numbers["log_evidence"] - numbers["exact_log_evidence"]) < 2


def test_plots_need_history_and_draw_on_given_axes():
    import matplotlib.pyplot as plt
    import pytest

    model = LinearGaussian()
    _, y = model.simulate(20, np.random.default_rng(0))
    r = pps.smc(model.bootstrap(y), 30, seed=0, store_history=True)
    fig, ax = plt.subplots()
    assert plots.plot_genealogy(r, ax) is ax
    assert plots.plot_ess([r, r], labels=["a", "b"]) is not None
    with pytest.raises(ValueError, match="store_history"):
        plots.plot_genealogy(pps.smc(model.bootstrap(y), 30, seed=0))
    plt.close("all")
