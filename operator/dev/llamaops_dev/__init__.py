"""LlamaOps development tooling: a local control plane (`devcluster`) and a dev node whose pods run as local
processes (`devnode`).

A separate distribution (operator/dev/pyproject.toml, installed by `make venv`): the operator image and
`pip install 'llamaops[operator]'` contain neither it nor its PKI dependency (cryptography). With it installed,
the `llamaops` command gains `dev-cluster` through the `llamaops.commands` entry point.
"""
