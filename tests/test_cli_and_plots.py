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


def test_scaling_plot_and_report_keep_settings_and_errors_apart(tmp_path):
    import json

    from ppl_scaling.models.report import plot_scaling, read_results, report

    def row(pid, budget, correct, sid, **kw):
        return {"problem_id": pid, "method": "best_of_n", "budget": budget, "correct": correct, "tokens": 8 * budget,
                "settings_id": sid, **kw}
    lines = [{"ppl_scaling_results": 1, "settings_id": "s1", "settings": {"temperature": 1.0}},
             row("a", 1, True, "s1"), row("b", 1, False, "s1"), row("a", 4, True, "s1"),
             row("b", 4, None, "s1", error="context too long"),
             {"ppl_scaling_results": 1, "settings_id": "s2", "settings": {"temperature": 0.5}},
             row("a", 1, False, "s2"), row("a", 4, None, "s2", error="server down")]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    axes = plot_scaling(read_results(path).rows, tmp_path / "scaling.png")
    labels = sorted(h.get_label() for h in axes[0].get_legend_handles_labels()[0])
    assert labels == ["best_of_n [1]", "best_of_n [2]"] and (tmp_path / "scaling.png").stat().st_size > 1000
    text = report(path)
    assert "| best_of_n | 0.500 [0.09, 0.91] | 1.000 [0.21, 1.00] (1 err) |" in text   # 95 % Wilson intervals
    assert "| best_of_n | 0.000 [0.00, 0.79] | — (1 err) |" in text   # a cell whose every run failed
    assert "±" not in text


def test_scaling_plot_draws_accuracy_against_total_tokens_with_wilson_bars(tmp_path):
    import json

    from ppl_scaling.models.report import plot_scaling, read_results

    rows = [{"ppl_scaling_results": 1, "settings_id": "s", "settings": {}}]
    rows += [{"problem_id": p, "method": "best_of_n", "budget": n, "correct": n == 4 or p == "a", "tokens": 10 * n,
              "reward_tokens": 5 * n, "settings_id": "s"} for p in ("a", "b") for n in (1, 4)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    axes = plot_scaling(read_results(tmp_path / "r.jsonl").rows, tmp_path / "s.png")
    (line,) = axes[1].get_lines()[:1]
    assert list(line.get_xdata()) == [15, 60] and "reward" in axes[1].get_xlabel()   # generated + reward tokens
    segments = axes[0].collections[0].get_segments()   # error bars: the Wilson interval, not ± 0 at 100 %
    assert [round(float(s[1][1] - s[0][1]), 3) for s in segments] == [round(0.9054688 - 0.0945312, 3),
                                                                         round(1 - 0.3423802, 3)]
