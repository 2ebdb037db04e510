"""A minimal valid datafile with an ODP integration (for the examples, the CLI and tests)."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional


def datafile(host: Optional[str], public_key: Optional[str], revision: str = "1",
             sdk_key: str = "odp-ext-demo") -> str:
    """A datafile JSON string that every supported optimizely-sdk accepts.

    Args:
        host: The ODP host (``integrations[odp].host``); None leaves ODP not integrated.
        public_key: The ODP public key; None leaves ODP not integrated.
        revision: The datafile revision (a new one makes the SDK notify a config update).
        sdk_key: The project's SDK key.

    Returns:
        The datafile as JSON.
    """
    data: Dict[str, Any] = {
        "version": "4", "revision": revision, "projectId": "10001", "accountId": "10001",
        "sdkKey": sdk_key, "environmentKey": "production", "anonymizeIP": False, "botFiltering": False,
        "experiments": [], "events": [], "groups": [], "attributes": [], "audiences": [],
        "typedAudiences": [], "featureFlags": [], "rollouts": [], "variables": [], "integrations": [],
    }
    if host is not None and public_key is not None:
        data["integrations"].append({"key": "odp", "host": host, "publicKey": public_key})
    return json.dumps(data)
