"""`python -m llamaops.devcluster up|down|status`."""

from llamaops.devcluster.cli import app

app(prog_name="llamaops dev-cluster")
