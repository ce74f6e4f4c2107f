"""What the platform team allows a LlamaFineTune or LlamaServe to ask for (the chart's `policy` values).

A run or a serve is a pod with the image, priority class and queue priority its
spec names; on a shared cluster those are the platform's to allow:

- images: `spec.image` (trainer, server) must match one of the allowed patterns
  (shell-style globs); by default the operator's own configured images;
- priority classes: `resources.priorityClassName` must be one of the allowed;
  by default none (pods keep the cluster's default priority);
- queue priority: `queue.priority` at most the ceiling (a run at 10^9 would
  otherwise go first over everyone, every time).

Pure: each check returns the problems, naming the field and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from llamaops.api import LlamaFineTune, LlamaServe
from llamaops.api.validation import Problem


@dataclass(frozen=True)
class Policy:
    allowed_images: tuple[str, ...]  # globs; "*" allows any
    allowed_priority_classes: tuple[str, ...] = ()  # globs
    max_priority: int = 1000

    def _image(self, image: str | None) -> list[Problem]:
        if image is None or any(fnmatchcase(image, p) for p in self.allowed_images):
            return []
        return [Problem("spec.image", f"{image!r} is not an image this cluster allows; allowed: "
                                      f"{_listed(self.allowed_images)} (the operator's policy.allowedImages)")]

    def _priority_class(self, name: str | None, field: str) -> list[Problem]:
        if name is None or any(fnmatchcase(name, p) for p in self.allowed_priority_classes):
            return []
        return [Problem(field, f"priority class {name!r} is not allowed; allowed: "
                               f"{_listed(self.allowed_priority_classes)} (the operator's policy.allowedPriorityClasses)")]

    def finetune(self, lft: LlamaFineTune) -> list[Problem]:
        spec = lft.spec
        problems = self._image(spec.image)
        problems += self._priority_class(spec.resources.priority_class_name, "spec.resources.priorityClassName")
        if spec.queue.priority > self.max_priority:
            problems.append(Problem("spec.queue.priority", f"{spec.queue.priority} is above the ceiling of "
                                                           f"{self.max_priority} (the operator's policy.maxPriority)"))
        return problems

    def serve(self, lsv: LlamaServe) -> list[Problem]:
        return self._image(lsv.spec.image) + self._priority_class(lsv.spec.resources.priority_class_name,
                                                                   "spec.resources.priorityClassName")


def _listed(patterns: Sequence[str]) -> str:
    return ", ".join(patterns) if patterns else "none"
