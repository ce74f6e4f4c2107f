"""What the platform allows a spec to ask for (state/policy.py, the chart's policy values): images, priority
classes, a ceiling on queue priority; each refusal names the field and what is allowed."""

from __future__ import annotations

from api_cases import example
from llamaops.api import LlamaFineTune, LlamaServe
from llamaops.settings import Settings


def run(**spec) -> LlamaFineTune:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["spec"].update(spec)
    return LlamaFineTune.model_validate(doc)


def test_by_default_only_the_operators_own_images_and_no_priority_class() -> None:
    policy = Settings().spec_policy()
    assert policy.finetune(run()) == []
    assert policy.finetune(run(image=Settings().trainer_image)) == []
    (image,) = policy.finetune(run(image="registry.evil/miner:1"))
    assert image.field == "spec.image" and "ghcr.io/llamaops/trainer:0.1.0" in image.message
    (pc,) = policy.finetune(run(resources={"priorityClassName": "system-node-critical"}))
    assert pc.field == "spec.resources.priorityClassName" and "allowed: none" in pc.message
    (priority,) = policy.finetune(run(queue={"priority": 1000000}))
    assert priority.field == "spec.queue.priority" and "ceiling of 1000" in priority.message


def test_the_platform_widens_it_with_patterns() -> None:
    policy = Settings.from_env({"LLAMAOPS_ALLOWED_IMAGES": "registry.corp/llm/*, ghcr.io/llamaops/*",
                                "LLAMAOPS_ALLOWED_PRIORITY_CLASSES": "training-*",
                                "LLAMAOPS_MAX_PRIORITY": "50"}).spec_policy()
    assert policy.finetune(run(image="registry.corp/llm/trainer:2", queue={"priority": 50},
                               resources={"priorityClassName": "training-low"})) == []
    assert [p.field for p in policy.finetune(run(image="docker.io/x:1", queue={"priority": 51},
                                                 resources={"priorityClassName": "batch"}))] == [
        "spec.image", "spec.resources.priorityClassName", "spec.queue.priority"]
    serve = LlamaServe.model_validate({**example("llama-3.1-8b-serve.yaml"), "spec": {
        **example("llama-3.1-8b-serve.yaml")["spec"], "image": "vllm/vllm-openai:latest"}})
    assert [p.field for p in policy.serve(serve)] == ["spec.image"]
    assert Settings.from_env({"LLAMAOPS_ALLOWED_IMAGES": "*"}).spec_policy().serve(serve) == []
