"""LlamaServe validation with the runtimes: api.validation's shared checks, then those of spec.runtime's runtime.

Also refuses a section of another runtime (`ollama:` on a vLLM serve, settings in
`vllm:` on an Ollama one): nothing reads it, so the user would be misled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamaops.api import LlamaServe
from llamaops.api import validation as api_validation
from llamaops.api.catalog import CatalogModel
from llamaops.api.finetune import LlamaFineTune
from llamaops.api.validation import AdapterFacts, Problem, Result, RuntimeReport
from llamaops.builders.serve.runtime import ServeError, get, names, runtimes


def runtime_checks(lsv: LlamaServe, model: CatalogModel | None, adapters: Mapping[str, AdapterFacts]) -> RuntimeReport:
    """The checks of the runtime spec.runtime names (an unknown name is the one problem)."""
    try:
        runtime = get(lsv.spec.runtime)
    except ServeError:
        return RuntimeReport([Problem("spec.runtime", f"unsupported runtime {lsv.spec.runtime!r}: use one of "
                                                      f"{', '.join(names())}")])
    report = runtime.validate(lsv, model, adapters)
    for other in runtimes():
        if other.name != runtime.name and other.section and other.section_set(lsv):
            report.problems.append(Problem(f"spec.{other.section}", f"runtime is {runtime.name}: the {other.section} "
                                           f"section is not read; remove it, or set runtime: {other.name}"))
    return report


def validate_serve(manifest: Mapping[str, Any], finetunes: Mapping[str, LlamaFineTune] | None = None, *,
                   warn_missing: bool = True) -> Result:
    """Every problem of a LlamaServe manifest (see api.validation.validate_serve for `finetunes`)."""
    return api_validation.validate_serve(manifest, finetunes, warn_missing=warn_missing,
                                         runtime_checks=runtime_checks)


def validate_manifest(manifest: Mapping[str, Any]) -> Result:
    """Every problem of a LlamaFineTune or LlamaServe manifest."""
    return api_validation.validate_manifest(manifest, runtime_checks=runtime_checks)
