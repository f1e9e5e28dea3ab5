"""What ``medclipsam models list`` prints: the registered models, or one model's versions with
their kind, aliases, recorded evaluation scores and last promotion decisions."""

from __future__ import annotations

import time
from collections import defaultdict

from ..errors import ModelError
from ..runs.tracking import KIND_TAG
from .lock import is_lock


def describe_models(client) -> list[str]:
    models = [m for m in client.search_registered_models(max_results=1000) if not is_lock(m)]
    if not models:
        return ["no registered models"]
    lines = [f"{'name':<32} {'latest':>6}  aliases"]
    for model in sorted(models, key=lambda m: m.name):
        latest = max((int(v.version) for v in model.latest_versions or []), default=0)
        aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted((model.aliases or {}).items()))
        lines.append(f"{model.name:<32} {latest:>6}  {aliases}")
    return lines


def describe_model(client, name: str) -> list[str]:
    try:
        model = client.get_registered_model(name)
    except Exception as exc:
        raise ModelError(f"no registered model named {name}") from exc
    aliases: dict[str, list[str]] = defaultdict(list)
    for alias, version in (model.aliases or {}).items():
        aliases[str(version)].append(f"@{alias}")
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    lines = [f"{name}: {len(versions)} version(s)"]
    for v in versions:
        tags = dict(v.tags or {})
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime((v.creation_timestamp or 0) / 1000))
        lines.append(f"v{v.version:<4} {tags.get(KIND_TAG, tags.get('kind', '?')):<14} {created}  "
                     f"{' '.join(sorted(aliases.get(str(v.version), [])))}")
        lines.extend(f"      {line}" for line in _scores(tags) + _promotions(tags))
    return lines


def _grouped(tags: dict[str, str], prefix: str) -> dict[str, dict[str, str]]:
    """``<prefix><group>.<field>`` tags as {group: {field: value}}."""
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for key, value in tags.items():
        if key.startswith(prefix):
            group, _, field = key.removeprefix(prefix).rpartition(".")
            found[group][field] = value
    return found


def _scores(tags: dict[str, str]) -> list[str]:
    """``medclipsam.eval.<key>.<field>`` tags, one line per evaluation."""
    return [f"score [{k}] DSC {float(v.get('dsc', 'nan')):.4f} NSD {float(v.get('nsd', 'nan')):.4f} on "
            f"{v.get('n_cases', '?')} case(s) of {v.get('eval_set', '?')}"
            for k, v in sorted(_grouped(tags, "medclipsam.eval.").items())]


def _promotions(tags: dict[str, str]) -> list[str]:
    return [f"promotion @{alias}: {v.get('decision', '?')} at {v.get('time', '?')} ({v.get('reason', '')})"
            for alias, v in sorted(_grouped(tags, "medclipsam.promotion.").items())]
