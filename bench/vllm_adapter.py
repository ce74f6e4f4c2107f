"""What we hand vLLM, checked by vLLM's own code: a trained adapter and the chat template of its LlamaServe.

Opt-in, like bench/vllm_args.py (vLLM lives in a venv of its own; nothing is downloaded, no GPU):

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm==0.33.0
    .venv/bin/python bench/vllm_adapter.py --vllm-python /tmp/vllm-venv/bin/python

Here: a tiny Llama, an adapter trained on it by our trainer (`llamaops run --local`, LoRA on all seven linear
layers), and the LlamaServe (runtime vllm) that serves it, built by the operator's builder. In the vLLM venv:

  - the adapter passes vLLM's PEFT checks (PEFTHelper.validate_legal against a LoRAConfig with the
    --max-lora-rank and --max-loras we emit) and loads (LoRAModel.from_local_checkpoint, the modules vLLM's
    Llama takes LoRA on);
  - the chat template file we mount renders, through vLLM's chat-template code (load_chat_template,
    safe_apply_chat_template), exactly what our trainer trained on: the conversation with the run's system
    prompt, byte for byte, and with the generation prompt the same tokens;
  - negative controls: an adapter adapting lm_head, one saving lm_head whole (modules_to_save; vllm#9280) and
    one of a rank above our --max-lora-rank are refused by vLLM, and by our validation first, naming the field.

Prints one line per check; exit 0 when all hold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llamaops.api.manifests import dump, load_all

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are a concise assistant for Kubernetes questions."
QUESTION = "what colour does alice like?"

CHILD = r'''
import json, os, sys
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
import torch, vllm
from vllm.config import ModelConfig
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.renderers.chat_utils.chat_template import load_chat_template
from vllm.renderers.hf import safe_apply_chat_template
from vllm.tokenizers import get_tokenizer

job = json.load(sys.stdin)
out = {"vllm": vllm.__version__, "adapters": {}}
# The modules vLLM's Llama takes LoRA on: its packed layers' parts, and the unpacked ones.
expected = {m for parts in LlamaForCausalLM.packed_modules_mapping.values() for m in parts} | {"o_proj", "down_proj"}
out["expected_modules"] = sorted(expected)
lora_config = LoRAConfig(max_lora_rank=job["max_lora_rank"], max_loras=job["max_loras"])
for name, path in job["adapters"].items():
    try:
        helper = PEFTHelper.from_local_dir(path, max_position_embeddings=job["max_position_embeddings"])
        helper.validate_legal(lora_config)
        lora = LoRAModel.from_local_checkpoint(path, expected, helper, lora_model_id=1, device="cpu",
                                               dtype=torch.float32)
        out["adapters"][name] = {"ok": True, "modules": len(lora.loras), "rank": lora.rank}
    except Exception as exc:
        out["adapters"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
config = ModelConfig(model=job["model"], tokenizer=job["model"])
tokenizer = get_tokenizer(job["model"])
template = load_chat_template(job["template"])
out["full"] = safe_apply_chat_template(config, tokenizer, job["conversation"], chat_template=template,
                                       tokenize=False, add_generation_prompt=False)
out["prompt"] = safe_apply_chat_template(config, tokenizer, job["conversation"][:-1], chat_template=template,
                                         tokenize=False, add_generation_prompt=True)
out["prompt_ids"] = safe_apply_chat_template(config, tokenizer, job["conversation"][:-1], chat_template=template,
                                             tokenize=True, add_generation_prompt=True)
print(json.dumps(out))
'''


def train(work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A tiny Llama and an adapter our trainer makes on it (20 steps); returns (model dir, adapter dir, run doc)."""
    data = work / "claim"
    subprocess.run([sys.executable, "-m", "llamaops_trainer.tiny", "--model-dir", str(data / "models" / "tiny-llama"),
                    "--dataset", str(data / "datasets" / "chat.jsonl")], check=True, capture_output=True)
    doc = load_all((REPO / "examples" / "tiny-llama-cpu.yaml").read_text().replace("llamaops-demo", "claim"))[0]
    doc["spec"]["lora"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]
    (work / "run.yaml").write_text(dump(doc))
    subprocess.run([sys.executable, "-m", "llamaops", "run", "--local", "-f", str(work / "run.yaml"), "--pvc-root",
                    str(work), "--output-dir", str(work / "out"), "--max-steps", "20"], check=True, capture_output=True)
    return data / "models" / "tiny-llama", work / "out" / "adapter", doc


def negatives(adapter: Path, work: Path) -> dict[str, Path]:
    """Adapters vLLM must refuse, made from the trained one: lm_head adapted, lm_head saved whole, rank 16."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    hidden = next(t for k, t in tensors.items() if k.endswith("q_proj.lora_A.weight")).shape[1]
    r = config["r"]
    out = {}
    for name, change in (("lm_head-target", "target"), ("lm_head-saved", "save"), ("rank-16", "rank")):
        d = work / name
        shutil.copytree(adapter, d)
        cfg, ts = dict(config), dict(tensors)
        if change == "target":
            cfg["target_modules"] = [*config["target_modules"], "lm_head"]
            ts["base_model.model.lm_head.lora_A.weight"] = torch.zeros(r, hidden)
            ts["base_model.model.lm_head.lora_B.weight"] = torch.zeros(1024, r)
        elif change == "save":
            cfg["modules_to_save"] = ["lm_head"]
            ts["base_model.model.lm_head.weight"] = torch.zeros(1024, hidden)
        else:
            cfg["r"] = 16
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(ts, str(d / "adapter_model.safetensors"))
        out[name] = d
    return out


def ours(run_doc: dict[str, Any], lora: dict[str, Any], max_lora_rank: int | None = None) -> list[str]:
    """Our validation of a vLLM LlamaServe of a run trained with `lora` (its LlamaFineTune as the operator has it)."""
    from llamaops.api import LlamaFineTune
    from llamaops.builders.serve import validate_serve

    doc = json.loads(json.dumps(run_doc))
    doc["metadata"] = {"name": "tiny", "namespace": "ml"}
    doc["spec"]["lora"].update(lora)
    run = LlamaFineTune.model_validate(doc)
    serve = serve_doc(run_doc)
    if max_lora_rank:
        serve["spec"]["vllm"]["max_lora_rank"] = max_lora_rank
    return [str(p) for p in validate_serve(serve, finetunes={"tiny": run}).errors]


def serve_doc(run_doc: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaServe", "metadata": {"name": "tiny", "namespace": "ml"},
            "spec": {"model": {"base_model": run_doc["spec"]["model"]["base_model"]},
                     "vllm": {"max_model_len": 512}, "adapters": [{"name": "k8s-tiny", "fineTuneRef": "tiny"}]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", default=os.environ.get("LLAMAOPS_VLLM_PYTHON", "/tmp/vllm-venv/bin/python"))
    args = parser.parse_args(argv)
    from llamaops.api import LlamaServe
    from llamaops.builders import serve as b
    from llamaops.builders.serve.vllm import CHAT_TEMPLATE_FILE
    from llamaops.settings import Settings
    from llamaops_trainer.data import ChatEncoder, to_messages
    from llamaops_trainer.sources import Record
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, adapter, run_doc = train(work)
        report = json.loads((adapter / "llamaops.json").read_text())
        lsv = LlamaServe.model_validate(serve_doc(run_doc))
        resolved = b.ResolvedAdapter("k8s-tiny", "pvc://claim/out/adapter", "LlamaFineTune/tiny",
                                     run_doc["spec"]["model"]["base_model"], report.get("r", 8), SYSTEM, "v1")
        w = b.workload(lsv, [resolved], Settings())
        argv = w.deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        template = work / "chat-template.jinja"
        template.write_text(w.config_maps[0]["data"][CHAT_TEMPLATE_FILE])
        # What the trainer trained on: the dataset row with the run's system prompt put first, rendered.
        tok = AutoTokenizer.from_pretrained(model)
        from llamaops.api import LlamaFineTune

        spec = LlamaFineTune.model_validate({**run_doc, "metadata": {"name": "tiny"}}).spec
        row = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "alice likes red."}]}
        conversation = to_messages(Record("chat.jsonl:1", row), spec.dataset, spec.system_prompt)
        encoder = ChatEncoder(tok)
        job = {"adapters": {"trained": str(adapter), **{k: str(v) for k, v in negatives(adapter, work).items()}},
               "max_lora_rank": int(argv[argv.index("--max-lora-rank") + 1]),
               "max_loras": int(argv[argv.index("--max-loras") + 1]), "max_position_embeddings": 4096,
               "model": str(model), "template": str(template), "conversation": conversation}
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
        proc = subprocess.run([args.vllm_python, "-c", CHILD], input=json.dumps(job), capture_output=True, text=True,
                              timeout=900, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 2
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        trained_full = encoder.render(conversation)
        trained_prompt = encoder.render(conversation[:-1], add_generation_prompt=True)
        trained_ids = tok(trained_prompt, add_special_tokens=False)["input_ids"]

    checks: list[tuple[str, bool, str]] = []
    a = got["adapters"]
    checks.append((f"our adapter passes vLLM's PEFT checks (--max-lora-rank {job['max_lora_rank']}, --max-loras "
                   f"{job['max_loras']}) and loads: {a['trained'].get('modules')} LoRA modules, rank "
                   f"{a['trained'].get('rank')}", a["trained"]["ok"], a["trained"].get("error", "")))
    checks.append(("vLLM's chat-template code renders our mounted template to the trained conversation, byte for "
                   f"byte ({len(trained_full)} chars, system prompt included)", got["full"] == trained_full,
                   f"{got['full']!r} != {trained_full!r}"))
    checks.append((f"... and the generation prompt to the same {len(trained_ids)} tokens",
                   got["prompt"] == trained_prompt and got["prompt_ids"] == trained_ids,
                   f"{got['prompt']!r} / {got['prompt_ids']}"))
    controls = {"lm_head-target": ({"target_modules": ["q_proj", "lm_head"]}, None),
                "lm_head-saved": ({"modules_to_save": ["lm_head"]}, None),
                "rank-16": ({"r": 16}, job["max_lora_rank"])}
    for name, (lora, rank) in controls.items():
        refused = ours(run_doc, lora, rank)
        verdict = a[name]
        checks.append((f"control {name}: vLLM refuses ({verdict.get('error', 'accepted!')[:150]}); we refuse: "
                       f"{refused[0][:150] if refused else 'accepted!'}", not verdict["ok"] and bool(refused), ""))
    print(f"vLLM {got['vllm']}; LoRA modules of its Llama: {', '.join(got['expected_modules'])}")
    for what, ok, why in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok and why:
            print(f"       {why[:600]}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
