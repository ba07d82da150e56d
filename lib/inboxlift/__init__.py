"""inboxlift: Spark jobs that turn a shop's event data into personalised marketing emails."""

__version__ = "0.1.0"
