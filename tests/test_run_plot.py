"""The run's plot: rounds on integer ticks, each agent named with what it trains on."""

from __future__ import annotations

from edgetune.runner import RunOptions, agent_labels, draw_run


def test_the_plot_names_each_agent_with_its_data_and_counts_rounds_in_whole_numbers():
    rows = [{"round": r, "accuracy": 0.5 + 0.1 * r, "eval": "central",
             "agents": {a: {"train_loss": 1.0 - 0.1 * r} for a in ("agent-1", "agent-2")} if r else {}}
            for r in range(3)]
    labels = agent_labels(RunOptions(agents=2, agent_data=["/data/mine/a.csv", "/data/mine/b.jsonl"]))
    assert labels == {"agent-1": "a.csv", "agent-2": "b.jsonl"}
    fig = draw_run(rows, "t", labels)
    fig.canvas.draw()
    left, right = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["agent-1 (a.csv)", "agent-2 (b.jsonl)"]
    for ax in (left, right):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert agent_labels(RunOptions(agents=2, partition="iid"))["agent-2"] == "iid part 2/2 of demo:vader"
