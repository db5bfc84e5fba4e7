"""The demo command and the diagnostic plots run and write their files."""
import numpy as np

import ppl_scaling as pps
from ppl_scaling import plots
from ppl_scaling.cli import main
from ppl_scaling.ssm import LinearGaussian


def test_demo_writes_its_plot(tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "state_space_filter.png").stat().st_size > 10_000


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
