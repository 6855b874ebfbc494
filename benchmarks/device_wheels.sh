#!/usr/bin/env bash
# Build .whl/, the wheels that the device machine's Python lacks, for gpu.sh's calls (BENCHMARKS.md,
# "The next GPU call"): ../shared/tools/device-wheels.sh's Ray and what it needs, then pydantic
# (segpipe's RunConfig; the device machine's image had none on 2026-11-27) and TorchCodec
# (segpipe's JPEG decoder) at this checkout's versions. One call carries at most 64 MiB of wheels
# and tracked files, so the wheels lose what segpipe never loads (Ray's rllib and llm;
# TorchCodec's video and audio decoders, which load only where FFmpeg is installed), and their
# members over 1 MB are stored with LZMA, which pip reads like any zip (Ray's 45 -> 34 MB).
# Run from the repository root after `make test` or `make run` has made .venv.
set -euo pipefail
versions=$(.venv/bin/python - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in
                ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "torchcodec")))
PY
)
# shellcheck disable=SC2086  # one argument per pinned package
bash ../shared/tools/device-wheels.sh $versions
python3 - <<'PY'
import glob, os, re, zipfile
unused = {"ray": r"ray/(rllib|llm)/", "torchcodec": r"torchcodec/libtorchcodec_(core|custom_ops)\d+\.so$"}
for name, pattern in unused.items():
    wheel = glob.glob(f".whl/{name}-*.whl")[0]
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(wheel + ".tmp", "w") as kept:
        for item in source.infolist():
            if re.match(pattern, item.filename):
                continue
            data = source.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):  # pip checks the listed files against the wheel
                data = b"\n".join(line for line in data.split(b"\n") if not re.match(pattern.encode(), line.split(b",")[0]))
            item.compress_type = zipfile.ZIP_LZMA if len(data) > 1_000_000 else zipfile.ZIP_DEFLATED
            kept.writestr(item, data)
    os.replace(wheel + ".tmp", wheel)
PY
echo "wheels and tracked files: $(( $(du -cb .whl/* | tail -n 1 | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1) )) bytes of the 67108864 a call carries"
