"""The Modelfiles the Ollama runtime writes, through a real Ollama: the prompt it renders is the trainer's.

For each Llama 3.x template family, the builder's Modelfile (FROM a tiny Llama's safetensors, TEMPLATE, SYSTEM)
is created by `ollama create` on a local `ollama serve` (hack/build-ollama.sh's binary), and chats are sent;
Ollama's trace log (OLLAMA_DEBUG=2) prints each prompt it renders, which must equal the trainer's rendering of
the same conversation (transformers, the served Jinja template) without its leading BOS, which Ollama adds when
tokenizing: the token count it reports must match too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llamaops.api import LlamaServe
from llamaops.api.chat_template import served_template
from llamaops.builders.serve.ollama import modelfiles
from llamaops.builders.serve.runtime import ServeContext
from llamaops_trainer import tiny
from local_binaries import ollama_binary
from trainer_helpers import free_port, http_ok

REPO = Path(__file__).resolve().parents[2]
SYSTEM = "You answer in one sentence."


@pytest.fixture(scope="module")
def ollama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    binary = ollama_binary()
    if binary is None:
        pytest.skip("no ollama binary: `make test` builds it (hack/build-ollama.sh; LLAMAOPS_OLLAMA_BIN_DIR)")
    root = tmp_path_factory.mktemp("ollama")
    model = tiny.write_model(root / "models" / "tiny-llama")
    host = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, OLLAMA_HOST=host, OLLAMA_MODELS=str(root / "store"), HOME=str(root), OLLAMA_DEBUG="2")
    log = root / "serve.log"
    proc = subprocess.Popen([str(binary), "serve"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not http_ok(f"http://{host}/") and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        yield {"binary": binary, "env": env, "host": host, "log": log, "model": model, "root": root}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _chat(host: str, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": 2}).encode()
    req = urllib.request.Request(f"http://{host}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


CONVERSATIONS = [
    [{"role": "user", "content": "what colour does alice like?"}],
    [{"role": "user", "content": "what colour does alice like?"}, {"role": "assistant", "content": "alice likes red."},
     {"role": "user", "content": "and bob?"}],
    [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "what colour does bob like?"}],
]


@pytest.mark.parametrize("base", ["meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"])
def test_ollama_renders_the_trained_prompt(ollama: dict[str, Any], base: str) -> None:
    lsv = LlamaServe.model_validate({"metadata": {"name": "tiny", "namespace": "ml"},
                                     "spec": {"runtime": "ollama", "model": {"base_model": base},
                                              "systemPrompt": SYSTEM, "adapters": []}})
    config_dir = ollama["root"] / "modelfiles" / base.rsplit("/", 1)[-1]
    config_dir.mkdir(parents=True)
    ctx = ServeContext(adapters=[], adapter_paths={}, model_path=str(ollama["model"]), config_dir=str(config_dir))
    [(name, doc)] = modelfiles(lsv, ctx)
    (config_dir / "model-0").write_text(doc)
    created = subprocess.run([str(ollama["binary"]), "create", name, "-f", str(config_dir / "model-0")],
                             env=ollama["env"], capture_output=True, text=True)
    assert created.returncode == 0, created.stdout + created.stderr

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ollama["model"])
    template = served_template(base, SYSTEM)  # what vLLM serves, and (through the trainer's rule) what it trained
    for messages in CONVERSATIONS:
        before = ollama["log"].read_text(errors="replace")
        usage = _chat(ollama["host"], name, messages)["usage"]
        logged = ollama["log"].read_text(errors="replace")[len(before):]
        [prompt] = re.findall(r'msg="completion request" prompt="((?:[^"\\]|\\.)*)"', logged)
        expected = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
        assert expected.startswith("<|begin_of_text|>")
        assert json.loads(f'"{prompt}"') == expected.removeprefix("<|begin_of_text|>"), messages
        assert usage["prompt_tokens"] == len(tok(expected, add_special_tokens=False)["input_ids"])
