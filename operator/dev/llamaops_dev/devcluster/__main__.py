"""`python -m llamaops_dev.devcluster up|down|status`."""

from llamaops_dev.devcluster.cli import app

app(prog_name="llamaops dev-cluster")
