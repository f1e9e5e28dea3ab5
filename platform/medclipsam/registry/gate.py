"""The promotion gate: a version gets the alias (``champion``) only if it beats the version holding
it, on the same labelled cases through the same pipeline, by a margin.

1. Evaluate the candidate and the current holder.
2. Under the registry lock, read the holder again. If it is still the one evaluated, decide, move
   the alias if the candidate wins, and record the decision. If another promotion moved the alias
   meanwhile, evaluate the new holder and try again (so the alias never ends on the worse of two
   concurrent candidates).
3. Record both scores, the evaluation set's URI and content hash, the decision and its reason as
   tags on the candidate version and in an MLflow run (experiment ``medclipsam-promotions``).
``force`` moves the alias without evaluating; it needs a reason, which is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import InputError, ModelError, first_line
from ..runs import tracking
from .lock import AliasLock
from .version_scores import METRICS, EvalPlan, Score, evaluate_version

PROMOTION_EXPERIMENT = "medclipsam-promotions"
PROMOTED, KEPT, FORCED, UNCHANGED = "promoted", "kept", "forced", "unchanged"
RETRIES = 3  # holder changes tolerated during one promotion


@dataclass(frozen=True)
class Request:
    name: str
    version: str
    alias: str = "champion"
    metric: str = "dsc"
    margin: float = 0.01
    force: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InputError(f"--metric must be one of {', '.join(METRICS)}")
        if self.margin < 0:
            raise InputError("--margin must be 0 or more")
        if self.force and not self.reason.strip():
            raise InputError("--force needs --reason TEXT: a forced promotion records why")


@dataclass(frozen=True)
class Decision:
    name: str
    alias: str
    candidate: str
    holder: str | None  # the version that held the alias when the decision was made
    outcome: str  # promoted, kept, forced or unchanged
    reason: str
    candidate_score: Score | None = None
    holder_score: Score | None = None
    run_id: str = ""

    @property
    def alias_holder(self) -> str | None:
        """The version holding the alias after the decision."""
        return self.candidate if self.outcome in (PROMOTED, FORCED, UNCHANGED) else self.holder


def current_holder(client, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise ModelError(f"cannot read the alias {name}@{alias} ({first_line(exc)})") from exc


def decide(candidate: Score, holder: Score | None, metric: str, margin: float) -> tuple[bool, str]:
    """Whether the candidate wins, and why, in one sentence."""
    c = candidate.value(metric)
    if holder is None:
        return True, f"no version held the alias; v{candidate.version} {metric.upper()} {c:.4f}"
    h = holder.value(metric)
    if c > h and c - h >= margin:
        return True, (f"v{candidate.version} {metric.upper()} {c:.4f} beats v{holder.version} {h:.4f} by "
                      f"{c - h:.4f} (margin {margin:g})")
    return False, (f"v{candidate.version} {metric.upper()} {c:.4f} does not beat v{holder.version} {h:.4f} by the "
                   f"margin {margin:g} (difference {c - h:+.4f})")


def promote(client, request: Request, plan: EvalPlan | None,
            say: Callable[[str], None] = lambda line: None, evaluate=evaluate_version) -> Decision:
    """Run the gate for ``request``; ``plan`` says how versions are evaluated (None only with force)."""
    name, alias = request.name, request.alias
    try:
        client.get_model_version(name, request.version)
    except Exception as exc:
        raise ModelError(f"model {name} has no version {request.version}") from exc
    if request.force:
        with AliasLock(client, name):
            holder = current_holder(client, name, alias)
            client.set_registered_model_alias(name, alias, request.version)
            decision = Decision(name, alias, request.version, holder, FORCED, f"forced: {request.reason}")
            return _record(client, request, plan, decision)
    if plan is None:
        raise InputError("an evaluation set is needed to promote without --force")
    holder = current_holder(client, name, alias)
    if holder == request.version:
        return Decision(name, alias, request.version, holder, UNCHANGED, f"v{holder} already holds @{alias}")
    say(f"evaluating v{request.version} on {len(plan.eval_set.cases)} case(s)")
    candidate = evaluate(plan, request.version)
    held = _evaluate_holder(plan, holder, say, evaluate)
    for _ in range(RETRIES):
        with AliasLock(client, name):
            now = current_holder(client, name, alias)
            if now == holder:
                wins, reason = decide(candidate, held, request.metric, request.margin)
                if wins:
                    client.set_registered_model_alias(name, alias, request.version)
                decision = Decision(name, alias, request.version, holder, PROMOTED if wins else KEPT, reason,
                                    candidate, held)
                return _record(client, request, plan, decision)
        if now == request.version:
            return Decision(name, alias, request.version, now, UNCHANGED, f"v{now} was promoted meanwhile")
        say(f"@{alias} moved from v{holder} to v{now} during the evaluation: evaluating v{now}")
        holder, held = now, _evaluate_holder(plan, now, say, evaluate)
    raise ModelError(f"{name}@{alias} moved {RETRIES} times while this promotion evaluated; run it again")


def _evaluate_holder(plan: EvalPlan, holder: str | None, say, evaluate) -> Score | None:
    if holder is None:
        return None
    say(f"evaluating the holder v{holder}")
    return evaluate(plan, holder)


def _record(client, request: Request, plan: EvalPlan | None, decision: Decision) -> Decision:
    """Tags on the candidate (and the scores on each evaluated version), and an MLflow run."""
    prefix = f"medclipsam.promotion.{request.alias}"
    tags = {f"{prefix}.decision": decision.outcome, f"{prefix}.reason": decision.reason,
            f"{prefix}.holder_version": decision.holder or "", f"{prefix}.metric": request.metric,
            f"{prefix}.margin": f"{request.margin:g}", f"{prefix}.time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}
    if plan is not None:
        tags.update({f"{prefix}.eval_set": plan.eval_set.uri, f"{prefix}.eval_set_sha256": plan.eval_set.sha256})
    for role, score in (("candidate", decision.candidate_score), ("holder", decision.holder_score)):
        if score is not None:
            tags[f"{prefix}.{role}_{request.metric}"] = f"{score.value(request.metric):.6f}"
            _record_score(client, request.name, plan, score)
    params = {"model": request.name, "candidate_version": request.version, "holder_version": decision.holder or "",
              "alias": request.alias, "metric": request.metric, "margin": f"{request.margin:g}",
              "forced": str(request.force), "reason": request.reason or decision.reason}
    if plan is not None:
        params.update(eval_set=plan.eval_set.uri, eval_set_sha256=plan.eval_set.sha256, eval_key=plan.key(),
                      n_cases=str(len(plan.eval_set.cases)))
    metrics = {f"{role}_{m}": score.value(m) for role, score in
               (("candidate", decision.candidate_score), ("holder", decision.holder_score)) if score is not None
               for m in METRICS}
    run_id = tracking.record_run(client, PROMOTION_EXPERIMENT, f"{request.name} v{request.version} @{request.alias}",
                                 {"decision": decision.outcome}, params, metrics)
    tags[f"{prefix}.run_id"] = run_id
    for key, value in tags.items():
        client.set_model_version_tag(request.name, request.version, key, value)
    return replace(decision, run_id=run_id)


def _record_score(client, name: str, plan: EvalPlan, score: Score) -> None:
    """``medclipsam.eval.<key>.<metric>`` on the evaluated version, for ``models list``."""
    prefix = f"medclipsam.eval.{plan.key()}"
    values = {f"{prefix}.{m}": f"{score.value(m):.6f}" for m in METRICS}
    values.update({f"{prefix}.n_cases": str(score.n_cases), f"{prefix}.n_failed": str(score.n_failed),
                   f"{prefix}.eval_set": plan.eval_set.uri})
    for key, value in values.items():
        client.set_model_version_tag(name, score.version, key, value)
