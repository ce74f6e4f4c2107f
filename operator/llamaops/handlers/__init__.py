"""kopf glue: read state, call the pure builders and queue, write objects and status.

Importing this package registers the handlers with kopf.
"""

from llamaops.handlers import admission, finetune, jobs, reports, serve, watchdog  # noqa: F401
