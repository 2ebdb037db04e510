"""Where events go: a component that owns the ODP settings of the client's current datafile.

Written by the thread that applies a datafile (:meth:`OdpTarget.update`), read by everyone without a
lock: each field is one atomic read. An event queued with no target (none known yet, or one replaced
meanwhile) takes the first one, :attr:`OdpTarget.initial`, on the worker.
"""

from __future__ import annotations

from typing import Any, Optional

from ._batch import Target
from ._stats import INTEGRATED, NOT_INTEGRATED, REFUSED, UNDETERMINED
from .transport import check_host, events_url, mask_key


class OdpTarget:
    """The ODP host and key of the current datafile, and whether events may be sent at all.

    Args:
        logger: Where a new target (info) or a refused host (error) is said.
        allow_insecure_http: The ``allow_insecure_http`` option (see :func:`~.transport.check_host`).
    """

    __slots__ = ("_allow_insecure", "_logger", "initial", "refusal", "state", "target")

    def __init__(self, logger: Any, allow_insecure_http: bool) -> None:
        self._logger = logger
        self._allow_insecure = allow_insecure_http
        self.state = UNDETERMINED  # "undetermined", "integrated", "not_integrated" or "refused"
        self.target: Optional[Target] = None  # where new events go (None unless integrated)
        self.initial: Optional[Target] = None  # the first one: for events sent before any datafile
        self.refusal = ""  # why the host was refused (the error line of each refused event)

    def update(self, host: Optional[str], key: Optional[str], determined: bool) -> bool:
        """Applies the ODP host and key of a (new) datafile.

        Returns:
            Whether anything was applied (False while no datafile has arrived).
        """
        if not determined:
            return False
        if host and key:
            refusal = check_host(host, self._allow_insecure)
            if refusal:
                if self.state is not REFUSED or self.refusal != refusal:
                    self._logger.error(refusal)
                self.refusal = refusal
                self.target = None
                self.state = REFUSED
            else:
                target = Target(host, key, events_url(host))
                if target != self.target:
                    self._logger.info(f"ODP events go to {target.url} (key {mask_key(key)}).")
                    self.target = target
                if self.initial is None:
                    self.initial = target
                self.state = INTEGRATED
        else:
            self.target = None
            self.state = NOT_INTEGRATED
        return True
