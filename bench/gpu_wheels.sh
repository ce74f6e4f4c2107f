#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine without network: the trainer's pins except torch (the machine
# has it), for Linux x86_64 and CPython 3.11/3.12, into bench/wheels; bitsandbytes keeps only the CUDA library of
# --cuda (e.g. 128 for CUDA 12.8: match the machine's torch.version.cuda) to stay under the 64 MiB carried.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=128
[ "${1:-}" = --cuda ] && cuda=$2
out=bench/wheels
rm -rf "$out" && mkdir -p "$out"
pins=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]
want = ("transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "pydantic")
every = deps["dependencies"] + deps["optional-dependencies"]["trainer"]
print(" ".join(d for d in every if re.split(r"[=<>\[ ]", d)[0] in want))
PY
)
# peft, accelerate and bitsandbytes without their dependencies (they would pull torch and CUDA, which the
# machine has); the rest with theirs, except numpy (torch's machines have it).
no_deps=$(printf '%s\n' $pins | grep -E '^(peft|accelerate|bitsandbytes)==' | tr '\n' ' ')
with_deps=$(printf '%s\n' $pins | grep -vE '^(peft|accelerate|bitsandbytes)==' | tr '\n' ' ')
for v in 311 312; do
  common=(-q --only-binary :all: --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --python-version "$v" -d "$out")
  python3 -m pip download "${common[@]}" $with_deps psutil
  python3 -m pip download "${common[@]}" --no-deps $no_deps
done
rm -f "$out"/numpy-*
python3 - "$out" "$cuda" <<'PY'
import glob, os, sys, zipfile
out, cuda = sys.argv[1], sys.argv[2]
for wheel in glob.glob(f"{out}/bitsandbytes-*.whl"):
    keep = f"libbitsandbytes_cuda{cuda}.so"
    tmp = wheel + ".tmp"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = os.path.basename(item.filename)
            if name.startswith("libbitsandbytes_") and name != keep and "cpu" not in name:
                continue
            dst.writestr(item, src.read(item.filename))
    os.replace(tmp, wheel)  # RECORD still lists the dropped files: pip installs what is there
PY
printf '%s\n' $pins > "$out/requirements.txt"
du -sh "$out"
