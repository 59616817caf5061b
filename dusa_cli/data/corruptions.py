"""ImageNet-C corruption names, in the order the papers report them."""

from __future__ import annotations

from collections.abc import Iterable

from dusa_cli.errors import ConfigError

# The 15 benchmark corruptions in the paper's order (research/dusa_official.md §4).
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
                    raise ConfigError(
                        f"unknown corruption '{candidate}'; choose from: all, extra, all19, "
                        + ", ".join(ALL_CORRUPTIONS)
                    )
                if candidate not in resolved:
                    resolved.append(candidate)
    if not resolved:
        raise ConfigError("no corruption selected")
    return resolved
