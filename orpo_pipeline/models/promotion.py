"""Champion / challenger: a new model version takes the registry alias 'champion' only if it is not worse.

One decision at a time: the compare-and-set runs under a lock (a file lock beside the tracking store here; the
Dagster pool of the promotion asset serializes it across the instance), and the alias is read again inside it.
If it moved since the benchmarks scored the champion, the challenger is compared with the version that holds it
now, on that version's recorded score - used only when it was measured under the same settings (the same
settings digest, tagged by benchmark_scores / lm_eval_scores); otherwise the alias stays where it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHAMPION = "champion"
TAG = "champion_gate"
LOWER_IS_BETTER = {"chosen_nll"}
BENCHMARK_METRICS = {"preference_accuracy", "mean_log_odds_margin", "chosen_nll"}
LOCK_TIMEOUT_S = 600.0


def tag_names(metric: str) -> tuple[str, str]:
    """The model-version tags holding a version's recorded score for `metric` and its settings digest."""
    if metric in BENCHMARK_METRICS:
        return f"eval.{metric}", "eval.settings_digest"
    return f"lm_eval.{metric}", "lm_eval.settings_digest"


def decide(challenger: float, champion: float | None, tolerance: float, lower_is_better: bool = False
           ) -> tuple[bool, str]:
    if champion is None:
        return True, "first model: becomes champion"
    c, k = (-challenger, -champion) if lower_is_better else (challenger, champion)
    op = "<=" if lower_is_better else ">="
    if c >= k - tolerance:
        return True, f"challenger {challenger:.4f} {op} champion {champion:.4f} {'+' if lower_is_better else '-'} " \
                     f"tolerance {tolerance:g}: promoted"
    return False, f"challenger {challenger:.4f} is worse than champion {champion:.4f} beyond tolerance " \
                  f"{tolerance:g}: champion kept"


@dataclass
class Decision:
    promoted: bool
    reason: str
    version: str
    score: float
    champion_version: str | None  # the version compared with (the alias holder at decision time)
    champion_score: float | None
    champion_source: str  # "scored in this run", "recorded (same settings digest)", "none"
    alias_now: str

    def tags(self, metric: str, tolerance: float, digest: str) -> dict[str, str]:
        """Every champion_gate.* tag filled ("none" where there is no champion), never blank."""
        none = "none"
        return {
            f"{TAG}.decision": "promoted" if self.promoted else "rejected",
            f"{TAG}.reason": self.reason,
            f"{TAG}.metric": metric,
            f"{TAG}.challenger_score": f"{self.score:.4f}",
            f"{TAG}.champion_score": none if self.champion_score is None else f"{self.champion_score:.4f}",
            f"{TAG}.champion_version": self.champion_version or none,
            f"{TAG}.champion_score_source": self.champion_source,
            f"{TAG}.tolerance": str(tolerance),
            f"{TAG}.settings_digest": digest,
        }


def alias_version(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def recorded_score(client, name: str, version: str, metric: str, digest: str) -> float | None:
    """A version's score for `metric` as its tags record it, if measured under the same settings digest."""
    value_tag, digest_tag = tag_names(metric)
    tags = client.get_model_version(name, version).tags
    if tags.get(digest_tag) != digest or value_tag not in tags:
        return None
    return float(tags[value_tag])


def promote(client, name: str, version: str, metric: str, score: float, digest: str, tolerance: float,
            seen_champion: str | None, seen_champion_score: float | None, lock_path: Path,
            run_id: str | None = None) -> Decision:
    """Decide and, if the challenger wins, move the alias; tag the version with what happened."""
    from filelock import FileLock

    lower = metric in LOWER_IS_BETTER
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
        current = alias_version(client, name)
        if current == version:
            champ, champ_score, source = None, None, "none"
            promoted, why = True, "already the champion"
        else:
            if current is None:
                champ, champ_score, source = None, None, "none"
            elif current == seen_champion and seen_champion_score is not None:
                champ, champ_score, source = current, seen_champion_score, "scored in this run"
            else:  # the alias moved while this run benchmarked: compare with the version holding it now
                champ, champ_score = current, recorded_score(client, name, current, metric, digest)
                source = "recorded (same settings digest)" if champ_score is not None else "not comparable"
            if champ is not None and champ_score is None:
                promoted, why = False, (f"champion v{champ} has no {metric} measured under settings digest {digest} "
                                        "(it changed during this run, or was scored otherwise): champion kept")
            else:
                promoted, why = decide(score, champ_score, tolerance, lower)
        if promoted and current != version:
            client.set_registered_model_alias(name, CHAMPION, version)
        decision = Decision(promoted, why, version, score, champ, champ_score, source,
                            version if promoted else (current or "none"))
        for k, v in decision.tags(metric, tolerance, digest).items():
            client.set_model_version_tag(name, version, k, v)
        if run_id:
            client.set_tag(run_id, f"{TAG}.decision", "promoted" if promoted else "rejected")
    return decision
