"""Check the `vllm serve` arguments LlamaOps builds against vLLM's own argument parser.

Opt-in (not part of `make test`): vLLM is a multi-gigabyte install, so it lives
in a venv of its own and this script drives it in a subprocess:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm==0.33.0
    .venv/bin/python bench/vllm_args.py --vllm-python /tmp/vllm-venv/bin/python

For a handful of LlamaServes (the seed example with its adapter and chat
template; every adapter source with tensor parallelism, an API key and extra
arguments; no adapters) the operator's builder makes the container's argv, and
vLLM's parser (`vllm.entrypoints.common.cli_args.make_arg_parser` on a
`vllm.utils.argparse_utils.FlexibleArgumentParser`, as `vllm serve` builds it)
parses it; `validate_parsed_serve_args` runs (it loads the chat template),
`AsyncEngineArgs.from_cli_args` takes the result, and the LoRA settings build a
`LoRAConfig`. The parsed values are compared with what the spec asked for.
Nothing is downloaded and no GPU is needed. Exit status 0 when every case parses as intended.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "tests")]

from api_cases import example  # noqa: E402
from llamaops.api import LlamaServe  # noqa: E402
from llamaops.builders import serve as b  # noqa: E402
from llamaops.builders.serve.vllm import CHAT_TEMPLATE_FILE  # noqa: E402
from llamaops.settings import DEFAULT_VLLM_IMAGE, Settings  # noqa: E402

BASE = "meta-llama/Llama-3.1-8B-Instruct"

# Runs inside the vLLM venv: argv cases on stdin, one JSON verdict per case on stdout.
CHILD = r'''
import json, sys
import vllm
from vllm.config.lora import LoRAConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

out = {"vllm": vllm.__version__, "cases": []}
for case in json.load(sys.stdin):
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    verdict = {"name": case["name"], "ok": False}
    try:
        args = parser.parse_args(case["argv"])
        args.subparser = "serve"
        if args.model_tag is not None:
            args.model = args.model_tag
        validate_parsed_serve_args(args)
        engine = AsyncEngineArgs.from_cli_args(args)
        if engine.enable_lora:
            LoRAConfig(max_lora_rank=engine.max_lora_rank, max_loras=engine.max_loras,
                       max_cpu_loras=engine.max_cpu_loras)
        got = {
            "model": engine.model, "port": args.port, "host": args.host,
            "tensor_parallel_size": engine.tensor_parallel_size, "max_model_len": engine.max_model_len,
            "gpu_memory_utilization": engine.gpu_memory_utilization, "dtype": engine.dtype,
            "served_model_name": engine.served_model_name, "enable_lora": bool(engine.enable_lora),
            "max_loras": engine.max_loras, "max_lora_rank": engine.max_lora_rank,
            "max_cpu_loras": engine.max_cpu_loras, "enable_prefix_caching": engine.enable_prefix_caching,
            "quantization": engine.quantization, "max_num_seqs": engine.max_num_seqs,
            "chat_template": args.chat_template, "api_key": args.api_key,
            "lora_modules": [{"name": m.name, "path": m.path, "base_model_name": m.base_model_name}
                             for m in args.lora_modules or []],
            "enable_chunked_prefill": engine.enable_chunked_prefill,
        }
        if isinstance(got["served_model_name"], list):
            got["served_model_name"] = got["served_model_name"][0]
        mismatches = {k: [got.get(k), v] for k, v in case["expect"].items() if got.get(k) != v}
        verdict.update(ok=not mismatches and not case.get("expect_error"), mismatches=mismatches)
    except BaseException as exc:  # argparse exits on bad arguments
        verdict["error"] = f"{type(exc).__name__}: {exc}"
        verdict["ok"] = bool(case.get("expect_error"))
    out["cases"].append(verdict)
print(json.dumps(out))
'''


def serve(**spec: Any) -> LlamaServe:
    doc = example("llama-3.1-8b-serve.yaml")
    doc["metadata"].update(namespace="ml", uid="u")
    doc["spec"].update(spec)
    return LlamaServe.model_validate(doc)


def cases(template_dir: Path) -> list[dict[str, Any]]:
    settings = Settings()
    prompt = "You are a helpful assistant specialized in Kubernetes operations."
    run = b.ResolvedAdapter("k8s-assistant", "pvc://adapters/ml/llama31-8b-lora/adapter",
                            "LlamaFineTune/llama31-8b-lora", BASE, 32, prompt, "2025-01-01T00:00:00Z")
    mixed = [b.ResolvedAdapter("a", "pvc://adapters/a", "uri", r=8),
             b.ResolvedAdapter("b", "s3://bucket/b", "uri", r=100),
             b.ResolvedAdapter("c", "hf://acme/c", "uri", r=16)]
    specs = [
        ("seed example + its run's adapter and system prompt", serve(), [run],
         {"model": BASE, "port": 8000, "host": "0.0.0.0", "tensor_parallel_size": 1, "max_model_len": 8192,
          "gpu_memory_utilization": 0.9, "dtype": "auto", "served_model_name": BASE, "enable_lora": True,
          "max_loras": 1, "max_lora_rank": 32, "api_key": None,
          "lora_modules": [{"name": "k8s-assistant", "path": "/var/lib/llamaops/adapters/k8s-assistant",
                            "base_model_name": BASE}]}),
        ("70B, tensor parallel 4, three adapter sources, API key, extra args",
         serve(model={"base_model": "meta-llama/Llama-3.3-70B-Instruct"}, systemPrompt="Be brief.",
               apiKeySecretRef={"name": "k", "key": "k"},
               vllm={"tensor_parallel_size": 4, "max_model_len": 32768, "port": 8080, "served_model_name": "llama70",
                     "max_num_seqs": 128, "dtype": "bfloat16", "quantization": "fp8", "max_cpu_loras": 8,
                     "enable_prefix_caching": False, "gpu_memory_utilization": 0.92,
                     "extra_args": ["--enable-chunked-prefill"]}),
         mixed,
         {"model": "meta-llama/Llama-3.3-70B-Instruct", "port": 8080, "tensor_parallel_size": 4,
          "max_model_len": 32768, "served_model_name": "llama70", "max_loras": 3, "max_lora_rank": 128,
          "max_cpu_loras": 8, "enable_prefix_caching": False, "quantization": "fp8", "max_num_seqs": 128,
          "dtype": "bfloat16", "gpu_memory_utilization": 0.92, "api_key": None, "enable_chunked_prefill": True,
          "lora_modules": [{"name": "a", "path": "/var/lib/llamaops/adapters/a", "base_model_name": "llama70"},
                           {"name": "b", "path": "/var/lib/llamaops/s3-adapters/b", "base_model_name": "llama70"},
                           {"name": "c", "path": "acme/c", "base_model_name": "llama70"}]}),
        ("base model only", serve(adapters=[]), [],
         {"enable_lora": False, "lora_modules": [], "chat_template": None, "max_model_len": 8192}),
    ]
    out = []
    for i, (name, lsv, adapters, expect) in enumerate(specs):
        w = b.workload(lsv, adapters, settings)
        ctr = w.deployment["spec"]["template"]["spec"]["containers"][0]
        assert ctr["command"] == ["vllm", "serve"], ctr["command"]
        argv = list(ctr["args"])
        if "--chat-template" in argv:
            # The pod reads it from the ConfigMap; here it is a local file with the same content.
            path = template_dir / f"case-{i}.jinja"
            path.write_text(w.config_maps[0]["data"][CHAT_TEMPLATE_FILE])
            argv[argv.index("--chat-template") + 1] = str(path)
            expect = {**expect, "chat_template": str(path)}
        out.append({"name": name, "argv": argv, "expect": expect})
    # The check itself must catch a bad value: a rank vLLM does not accept is refused.
    bad = list(out[0]["argv"])
    bad[bad.index("--max-lora-rank") + 1] = "24"
    out.append({"name": "control: --max-lora-rank 24 is refused by vLLM", "argv": bad, "expect": {},
                "expect_error": True})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python",
                        help="a Python with vLLM installed (pin: the version of the operator's default image)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        todo = cases(Path(tmp))
        # Building the parser asks the platform for its device type; on a machine without a GPU the
        # CUDA build finds none, so it is told to be the CPU platform (the serve arguments are the same).
        env = dict(os.environ)
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        proc = subprocess.run([args.vllm_python, "-c", CHILD], input=json.dumps(todo), capture_output=True,
                              text=True, timeout=600, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 2
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pinned = DEFAULT_VLLM_IMAGE.rsplit(":v", 1)[-1]
    print(f"vLLM {result['vllm']} (operator default image {DEFAULT_VLLM_IMAGE})")
    ok = result["vllm"] == pinned
    if not ok:
        print(f"  version mismatch: the operator pins {pinned}")
    for case, verdict in zip(todo, result["cases"], strict=True):
        mark = "ok  " if verdict["ok"] else "FAIL"
        print(f"  {mark} {verdict['name']}")
        if case.get("expect_error") and verdict["ok"]:
            print(f"       {verdict.get('error', '')[:200]}")
        if not verdict["ok"]:
            ok = False
            print(f"       argv: {' '.join(case['argv'])}")
            print(f"       {verdict.get('error') or verdict.get('mismatches')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
