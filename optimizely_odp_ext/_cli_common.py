"""What the commands share: where to send (--host/--key, --datafile, --sdk-key), the event manager
they send through, its logger, ``KEY[:TYPE]=VALUE`` flags, the exit statuses and the usage error."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from ._import import CONVERTERS
from ._sending import AckingTransport, Acks, bulk_manager

PROG = "optimizely-odp-ext"
KEY_ENV = "OPTIMIZELY_ODP_API_KEY"
SDK_KEY_ENV = "OPTIMIZELY_SDK_KEY"
DATAFILE_URL = "https://cdn.optimizely.com/datafiles/{sdk_key}.json"
EXIT_OK, EXIT_SOME_LOST, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command: printed as one line, exit status 2."""


def typed_pairs(values: Optional[List[str]], what: str) -> List[Tuple[str, str, str]]:
    """``KEY[:TYPE]=VALUE`` items as ``(key, type, value)``; TYPE is str, int, float or bool."""
    result = []
    for item in values or []:
        left, sep, value = item.partition("=")
        key, _, kind = left.partition(":")
        kind = kind or "str"
        if not sep or not key:
            raise UsageError(f"{what} must look like KEY=VALUE or KEY:TYPE=VALUE, got {item!r}")
        if kind not in CONVERTERS:
            raise UsageError(f"{what} {item!r}: unknown type {kind!r} (use str, int, float or bool)")
        result.append((key, kind, value))
    return result


def pairs(values: Optional[List[str]], what: str) -> Dict[str, str]:
    pairs = {}
    for key, kind, value in typed_pairs(values, what):
        if kind != "str":
            raise UsageError(f"{what} takes KEY=VALUE (no type), got {key}:{kind}")
        pairs[key] = value
    return pairs


def _check_host(host: str, allow_insecure_http: bool) -> None:
    from .transport import check_host

    refusal = check_host(host, allow_insecure_http)
    if refusal:
        # The library's line names install()'s keyword; here the flag is what the user can change.
        raise UsageError(refusal.replace("pass allow_insecure_http=True to install()", "add --allow-insecure-http"))


def credentials(args: argparse.Namespace) -> Tuple[str, str]:
    """The ODP host and public key from --host/--key, --datafile or --sdk-key (exactly one)."""
    given = [name for name, value in (("--host", args.host), ("--datafile", args.datafile),
                                      ("--sdk-key", args.sdk_key)) if value]
    if len(given) > 1:
        raise UsageError(f"give only one of {', '.join(given)}")
    if args.datafile or args.sdk_key:
        host, key = _from_datafile(args.datafile, args.sdk_key)
    elif args.host:
        host, key = args.host, args.key or os.environ.get(KEY_ENV) or ""
        if not key:
            raise UsageError(f"--host needs the ODP public key: --key KEY or the {KEY_ENV} environment variable")
    else:
        raise UsageError(f"where to send: --host URL with --key KEY (or {KEY_ENV}), --datafile FILE, "
                         f"or --sdk-key KEY (or {SDK_KEY_ENV})")
    _check_host(host, args.allow_insecure_http)
    return host, key


def _from_datafile(path: Optional[str], sdk_key: Optional[str]) -> Tuple[str, str]:
    from types import SimpleNamespace

    from .settings import odp_integration

    where = path or f"the datafile of SDK key {sdk_key[:4] if sdk_key else ''}..."
    try:
        if path:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        else:
            import requests

            response = requests.get(DATAFILE_URL.format(sdk_key=sdk_key), timeout=10)
            if response.status_code != 200:
                raise UsageError(f"cannot fetch {where}: HTTP {response.status_code}")
            text = response.text
        integrations = json.loads(text).get("integrations", [])
    except UsageError:
        raise
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"cannot read {where}: {getattr(exc, 'strerror', None) or exc}") from None
    # The plugin's own reading of a datafile (optimizely-sdk 4.x path): the same entry, the same rules.
    host, key, _ = odp_integration(SimpleNamespace(integrations=integrations))
    if not host or not key:
        raise UsageError(f"ODP is not integrated in {where} (no 'odp' entry with host and publicKey)")
    return host, key


def cli_logger(quiet: bool, *left_out: str) -> logging.Logger:
    """The event manager's logger: its warnings (delivery failing, retrying) go to stderr.

    Lines starting with one of ``left_out`` are not printed (the command prints its own).
    """
    logger = logging.getLogger("optimizely_odp_ext.cli")
    logger.propagate = False
    logger.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    # The closing line repeats what the summary says: left out.
    prefixes = ("ODP event manager closed", *left_out)
    handler.addFilter(lambda record: not record.getMessage().startswith(prefixes))
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    return logger


def event_manager(args: argparse.Namespace, host: str, key: str, logger: logging.Logger,
                  acks: Optional[Acks] = None, **extra: Any) -> Tuple[Any, List[AckingTransport]]:
    """An event manager sending to ``host``, and (once it sends) its transport, for the last failure."""
    from .settings import ConfigurationError

    try:
        return bulk_manager(host, key, logger, acks=acks, allow_insecure_http=args.allow_insecure_http,
                            retry_window=args.retry_window, request_timeout=args.request_timeout, **extra)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None


def reasons_text(dropped: Dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count)
