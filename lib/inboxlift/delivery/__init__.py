"""Sending the outbox over SMTP exactly once per message, and what comes back (README "Sending").

- :mod:`~inboxlift.delivery.selection`: which messages are due, and which are skipped (consent, age);
- :mod:`~inboxlift.delivery.partition`: the per-task sender (``mapInArrow``, one SMTP connection);
- :mod:`~inboxlift.delivery.smtp`: the connection, TLS, AUTH and one transaction;
- :mod:`~inboxlift.delivery.ratelimit`: each task's share of the rate limits, back-off;
- :mod:`~inboxlift.delivery.journal`: the run journals and the run lock;
- :mod:`~inboxlift.delivery.bookkeeping`: journals -> ``deliveries``, outbox statuses, suppressions;
- :mod:`~inboxlift.delivery.bounces`: delivery status notifications and complaint reports;
- :mod:`~inboxlift.delivery.sink`: the embedded Maildir server of the local mode.
"""
