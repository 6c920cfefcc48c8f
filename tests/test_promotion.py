"""The champion decision, serialized: concurrent promotions against one real MLflow SQLite registry."""

import threading

import pytest

from orpo_pipeline.models.promotion import decide, promote
from resources import MlflowResource

NAME = "promotion-test"
DIGEST = "same-settings"


def test_decide_rules():
    assert decide(0.6, None, 0.0) == (True, "first model: becomes champion")
    ok, why = decide(0.69, 0.70, 0.0)
    assert not ok and "champion kept" in why
    assert decide(0.69, 0.70, 0.02)[0]  # within the tolerance
    assert not decide(0.99, 0.70, -1.0)[0]  # tolerance -1: must beat the champion by 1.0
    assert decide(1.9, 2.0, 0.0, lower_is_better=True)[0]  # chosen_nll: lower wins
    assert not decide(2.1, 2.0, 0.0, lower_is_better=True)[0]


def _versions(tracking: MlflowResource, scores: list[float]) -> list[str]:
    client = tracking.client()
    client.create_registered_model(NAME)
    out = []
    for s in scores:
        run = client.create_run(tracking.experiment_id())
        v = str(client.create_model_version(NAME, source="file:///nonexistent", run_id=run.info.run_id).version)
        # what benchmark_scores records for each version
        client.set_model_version_tag(NAME, v, "eval.preference_accuracy", f"{s:.4f}")
        client.set_model_version_tag(NAME, v, "eval.settings_digest", DIGEST)
        out.append(v)
    return out


@pytest.mark.parametrize("scores", [[0.55, 0.75, 0.65], [0.75, 0.55, 0.65], [0.65, 0.55, 0.75]])
def test_three_concurrent_promotions_end_on_the_best(tmp_path, scores):
    """All three benchmarked while there was no champion, then decide at once. Each must compare with the alias
    as it stands when it decides, so the alias ends on the best, and every version's tags say what it was
    compared with."""
    tracking = MlflowResource(state_dir=str(tmp_path), registered_model_name=NAME)
    versions = _versions(tracking, scores)
    start = threading.Barrier(len(versions), timeout=60)
    decisions, errors = {}, []

    def one(version: str, score: float) -> None:
        try:
            client = MlflowResource(state_dir=str(tmp_path), registered_model_name=NAME).client()
            start.wait()
            decisions[version] = promote(client, NAME, version, "preference_accuracy", score, DIGEST, 0.0,
                                         seen_champion=None, seen_champion_score=None,
                                         lock_path=tmp_path / "locks" / "champion.lock")
        except Exception as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=one, args=(v, s)) for v, s in zip(versions, scores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(not t.is_alive() for t in threads)
    client = tracking.client()
    best = versions[scores.index(max(scores))]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == best
    by_score = dict(zip(versions, scores))
    promoted_once_first = [v for v, d in decisions.items() if d.champion_version is None]
    assert len(promoted_once_first) == 1  # exactly one saw no champion
    for v, d in decisions.items():
        tags = client.get_model_version(NAME, v).tags
        assert tags["champion_gate.decision"] == ("promoted" if d.promoted else "rejected")
        assert tags["champion_gate.champion_version"] == (d.champion_version or "none")
        assert all(tags[k] != "" for k in tags if k.startswith("champion_gate."))
        if d.champion_version is not None:
            # compared with the version that held the alias then, on that version's recorded score
            assert d.champion_score == pytest.approx(by_score[d.champion_version], abs=1e-4)
            assert d.promoted == (by_score[v] >= by_score[d.champion_version])
    # the comparisons chain: each promoted version is what a later decision compared with, or the final champion
    compared = {d.champion_version for d in decisions.values()} - {None}
    assert {v for v, d in decisions.items() if d.promoted} == compared | {best}


def test_moved_alias_with_other_settings_keeps_the_champion(tmp_path):
    tracking = MlflowResource(state_dir=str(tmp_path), registered_model_name=NAME)
    v1, v2 = _versions(tracking, [0.5, 0.9])
    client = tracking.client()
    client.set_model_version_tag(NAME, v1, "eval.settings_digest", "other-eval-split")
    client.set_registered_model_alias(NAME, "champion", v1)
    d = promote(client, NAME, v2, "preference_accuracy", 0.9, DIGEST, 0.0, seen_champion=None,
                seen_champion_score=None, lock_path=tmp_path / "champion.lock")
    assert not d.promoted and "settings digest" in d.reason and d.champion_source == "not comparable"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1


def test_three_concurrent_dagster_runs_leave_the_alias_on_the_best(tmp_path):
    """Three real processes, each a Dagster run of champion_promotion on one instance (pool `champion`), deciding
    at once: the alias ends on the best version, every run succeeds (its check too), and each version's tags say
    what it was compared with."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import dagster as dg

    root = Path(__file__).resolve().parents[1]
    home, state, barrier = tmp_path / "dagster_home", tmp_path / "state", tmp_path / "barrier"
    for d in (home, state, barrier):
        d.mkdir()
    shutil.copy(root / "dagster_home" / "dagster.yaml", home)
    with dg.DagsterInstance.from_config(str(home)):
        pass  # create the stores once, before three processes would migrate them at once
    tracking = MlflowResource(state_dir=str(state), registered_model_name=NAME)
    scores = [0.65, 0.75, 0.55]
    versions = _versions(tracking, scores)
    client = tracking.client()
    env = {**os.environ, "DAGSTER_HOME": str(home), "ORPO_PIPELINE_HOME": str(state), "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.promotion_run", v, str(s),
                               client.get_model_version(NAME, v).run_id, str(barrier), str(len(versions))],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for v, s in zip(versions, scores)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    best = versions[scores.index(max(scores))]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == best
    by_score = dict(zip(versions, scores))
    compared = {}
    for v in versions:
        tags = client.get_model_version(NAME, v).tags
        champion = tags["champion_gate.champion_version"]
        compared[v] = champion
        if champion != "none":
            assert float(tags["champion_gate.champion_score"]) == pytest.approx(by_score[champion], abs=1e-4)
            assert (tags["champion_gate.decision"] == "promoted") == (by_score[v] >= by_score[champion])
    assert list(compared.values()).count("none") == 1  # exactly one decided with no champion yet
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 3 and {r.status.value for r in runs} == {"SUCCESS"}
        checks = [e for r in runs for e in instance.all_logs(r.run_id)
                  if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert len(checks) == 3 and all(e.dagster_event.event_specific_data.passed for e in checks)
        # each run decided on its own version's score, not on another run's benchmark (the IO manager reads the
        # handle its own run wrote)
        for r in runs:
            mats = [e for e in instance.all_logs(r.run_id) if e.dagster_event
                    and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
                    and e.dagster_event.asset_key == dg.AssetKey("champion_promotion")]
            assert mats[0].dagster_event.materialization.metadata["challenger_version"].value == r.tags["test.version"]
