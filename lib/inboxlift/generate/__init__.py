"""Synthetic shop data (``inboxlift generate``): landing files a shop's export would produce, plus planted truth.

See :mod:`inboxlift.generate.shop` for the layout of what is written.
"""

from inboxlift.generate.dirty import EVENT_DIRTY_KINDS, PRODUCT_DIRTY_KINDS, USER_DIRTY_KINDS
from inboxlift.generate.shop import GenerateReport, batch_id_for, expected_events, generate_shop

__all__ = [
    "EVENT_DIRTY_KINDS", "PRODUCT_DIRTY_KINDS", "USER_DIRTY_KINDS", "GenerateReport", "batch_id_for",
    "expected_events", "generate_shop",
]
