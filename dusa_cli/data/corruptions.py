"""ImageNet-C corruption names, in the order the papers report them."""

from __future__ import annotations

from collections.abc import Iterable

from dusa_cli.errors import ConfigError, did_you_mean

# The 15 benchmark corruptions in the paper's order (docs/research/dusa_official.md §4).
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# The 4 held-out corruptions, used for tuning hyper-parameters, never for reported numbers.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def resolve_corruptions(names: Iterable[str]) -> list[str]:
    """Expand `all` (the 15), `extra` (the 4) and comma lists; reject unknown names."""
    resolved: list[str] = []
    for item in names:
        for name in (part.strip() for part in str(item).split(",")):
            if not name:
                continue
            group = {"all": CORRUPTIONS, "extra": EXTRA_CORRUPTIONS, "all19": ALL_CORRUPTIONS}
            candidates = group.get(name, (name,))
            for candidate in candidates:
                if candidate not in ALL_CORRUPTIONS:
                    raise _unknown(candidate, "all, extra, all19, ")
                if candidate not in resolved:
                    resolved.append(candidate)
    if not resolved:
        raise ConfigError("no corruption selected")
    return resolved


def check_severities(levels: Iterable[int]) -> tuple[int, ...]:
    """The distinct severities in the order given (`--severity 5 --severity 5` is one); each 1..5."""
    chosen = tuple(dict.fromkeys(levels))
    if not chosen:
        raise ConfigError("no severity selected")
    for level in chosen:
        if isinstance(level, bool) or level not in SEVERITIES:
            raise ConfigError(f"severity must be one of 1..5, got {level!r}")
    return chosen


def check_selection(corruptions: Iterable[str], severities: Iterable[int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The requested corruptions (groups like `all` expanded) and severities, validated."""
    return tuple(resolve_corruptions(corruptions)), check_severities(severities)


def check_task(corruption: str, severity: int) -> None:
    """One (corruption, severity), as a dataset of it is opened: a name, not a group."""
    if corruption not in ALL_CORRUPTIONS:
        raise _unknown(corruption)
    check_severities([severity])


def _unknown(name: str, groups: str = "") -> ConfigError:
    choices = ", ".join(ALL_CORRUPTIONS)
    return ConfigError(f"unknown corruption '{name}'{did_you_mean(name, ALL_CORRUPTIONS)} (choose from: {groups}{choices})")
