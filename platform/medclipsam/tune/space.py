"""The search space: which settings may be tuned, their values, and the task config of each point."""

from __future__ import annotations

import copy
import itertools
import random

from .. import storage
from ..config import TaskConfig, parse_config, parse_yaml
from ..errors import InputError, describe
from ..storage.access import reading

# The published grid: beta in {0.1, 1, 2} x bottleneck layer in {7, 8, 9}.
DEFAULT_SPACE: dict[str, list] = {"saliency.beta": [0.1, 1.0, 2.0], "saliency.layer": [7, 8, 9]}
TUNABLE = ("saliency.", "coarse.", "visual_prompts.", "text.prompts", "text.clip_model")
METRICS = ("dsc", "nsd")


def read_space(uri: str | None) -> dict[str, list]:
    """``{dotted.key: [values]}`` from a YAML mapping (the published grid without one)."""
    if uri is None:
        return dict(DEFAULT_SPACE)
    try:
        with reading(uri, "search space"):  # the store's own errors (credentials, endpoint) as one sentence
            raw = storage.read_bytes(uri)
    except OSError as exc:  # a missing or unreadable file
        raise InputError(f"{uri}: cannot read the search space ({describe(exc)})") from exc
    data = parse_yaml(raw, uri)
    if not isinstance(data, dict) or not data:
        raise InputError(f"{uri}: the search space must map setting names to lists of values")
    for key, values in data.items():
        if not any(key == t or key.startswith(t) for t in TUNABLE if t.endswith(".")) and key not in TUNABLE:
            raise InputError(f"{uri}: '{key}' cannot be tuned; the space takes saliency.*, coarse.*, "
                             "visual_prompts.*, text.prompts and text.clip_model")
        if not isinstance(values, list) or not values:
            raise InputError(f"{uri}: '{key}' needs a non-empty list of values")
    return data


def with_settings(base: dict, settings: dict) -> dict:
    """``base`` (a task config as a dict) with each dotted key of ``settings`` set."""
    out = copy.deepcopy(base)
    for dotted, value in settings.items():
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) or {}
        node[last] = value
    return out


def trial_settings(space: dict[str, list], max_trials: int | None, seed: int = 0) -> list[dict]:
    """Every combination of the space, or ``max_trials`` of them drawn without repetition."""
    names = list(space)
    combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]
    if max_trials is not None and max_trials < len(combos):
        combos = random.Random(seed).sample(combos, max_trials)
    return combos


def trial_config(base: dict, settings: dict, source: str = "<config>") -> TaskConfig:
    """The task config of one point of the space (an InputError naming ``source`` if it is invalid)."""
    return parse_config(with_settings(base, settings), source)


def check_points(base: dict, combos: list[dict], space_uri: str | None) -> None:
    """Every point of the space must be a valid config before anything runs."""
    for combo in combos:
        trial_config(base, combo, f"{space_uri or 'the default space'} at {combo}")
