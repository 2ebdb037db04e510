"""What we know about the host SDK: its supported range, its version, and its log messages."""

from __future__ import annotations

from typing import Tuple

# The optimizely-sdk range this plugin supports, stated once. setup.cfg's install_requires
# carries the same bounds (a test checks the two agree).
SUPPORTED_SDK_MIN: Tuple[int, int, int] = (4, 1, 1)
SUPPORTED_SDK_BELOW: Tuple[int, int, int] = (6, 0, 0)
SUPPORTED_SDK = ">=4.1.1, <6"


def _parse_version(text: str) -> Tuple[int, int, int]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def sdk_version() -> str:
    """Returns the installed optimizely-sdk version string (e.g. ``"5.7.0"``)."""
    from optimizely import version

    return str(version.__version__)


def sdk_version_tuple() -> Tuple[int, int, int]:
    """Returns the installed optimizely-sdk version as a 3-tuple of ints."""
    return _parse_version(sdk_version())


def is_supported_sdk(version: Tuple[int, int, int]) -> bool:
    """Whether ``version`` lies inside :data:`SUPPORTED_SDK`."""
    return SUPPORTED_SDK_MIN <= version < SUPPORTED_SDK_BELOW


# The SDK's own log lines, word for word (optimizely/helpers/enums.py and optimizely.py), so that
# users' log-based alerts keep matching after install.
INVALID_OPTIMIZELY = 'Optimizely instance is not valid. Failing "{}".'
INVALID_PROJECT_CONFIG = 'Invalid config. Optimizely instance is not valid. Failing "{}".'
ODP_INVALID_ACTION = "ODP action is not valid (cannot be empty)."
ODP_INVALID_IDENTIFIERS = "ODP events must have at least one key-value pair in identifiers."
ODP_INVALID_DATA = "ODP data is not valid."
ODP_NOT_ENABLED = "ODP is not enabled."
ODP_NOT_INTEGRATED = "ODP is not integrated."
ODP_EVENT_FAILED = "ODP event send failed ({})."
