"""End-to-end continual runs on the real backbone and data (marker e2e), capped to about a minute each."""
import json

import pytest

from mtpeft.cli import main

pytestmark = pytest.mark.e2e


def test_minilm_tweets_stream_seqft_forgets_and_the_oracle_does_not(tmp_path, capsys):
    """The `tweets` stream (domain-IL) through the CLI: three tasks, capped; the frozen experts picked by the task
    id keep every earlier task's accuracy exactly, fine-tuning in sequence moves it."""
    out = tmp_path / "run"
    argv = ["continual", "--config", "configs/continual-demo.yaml", "--out", str(out), "--compare",
            "seqft,expert-oracle", "--max-examples", "60", "--max-steps", "12", "--json"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tasks"][:2] == ["tweet_airline", "tweet_deflategate"] and rep["scenario"] == "domain-il"
    oracle = rep["strategies"]["expert-oracle"]["seeds"]["0"]
    assert oracle["metrics"]["bwt"] == 0.0 and oracle["metrics"]["forgetting"] == 0.0
    seq = rep["strategies"]["seqft"]["seeds"]["0"]["matrix"]["R"]
    assert any(seq[i][0] != seq[0][0] for i in range(1, 5))  # the shared module moves on every task
    # learnt: the oracle's last row beats the bare backbone on average
    assert sum(oracle["matrix"]["R"][-1]) > sum(oracle["matrix"]["untrained"]) + 0.25
    assert (out / "report.md").exists() and (out / "plots" / "acc_curve.png").exists()
