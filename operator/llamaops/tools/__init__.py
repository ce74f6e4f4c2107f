"""Generators of the committed files: the CRDs (`crdgen`, from the API models and the serving-runtime registry),
the chart's RBAC rules (`rbac`, from the one list of the operator's permissions), and the drift rule they share
(`generated`). Run by `make crds` / `make chart`; tests fail when the committed files drift."""
