"""The tracking and preference service (``inboxlift serve``): clicks, opens, one-click unsubscribe and a
preferences page, recorded as JSON-lines event files that ``ingest`` reads (docs/serve.md).

No Spark: the service verifies the links' tokens (:mod:`inboxlift.tokens`) and writes files.
"""

from inboxlift.service.app import build_app, event_line, events_dir
from inboxlift.service.events import EventLog, EventLogError, finalise_leftovers

__all__ = ["EventLog", "EventLogError", "build_app", "event_line", "events_dir", "finalise_leftovers"]
