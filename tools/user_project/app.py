"""The user's application code."""

from __future__ import annotations

from optimizely.optimizely import Optimizely

from optimizely_odp_ext import odp


def checkout(client: Optimizely, user_id: str, price: float) -> bool:
    odp(client).send_odp_event("purchased", {"fs_user_id": user_id}, data={"price": price})
    return odp(client).flush_odp_events(5)
