#!/usr/bin/env bash
# Build .whl/, the wheels that the device machine's Python lacks, for gpu.sh's calls (BENCHMARKS.md,
# "The next GPU call"): ../shared/tools/device-wheels.sh's Ray and what it needs, then pydantic
# (segpipe's RunConfig; the device machine's image had none on 2026-11-27) at this checkout's
# versions, and Ray's wheel without rllib and llm, which segpipe never imports: with them the
# wheels and the tracked files passed the 64 MiB that one call carries.
# Run from the repository root after `make test` or `make run` has made .venv.
set -euo pipefail
versions=$(.venv/bin/python - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in
                ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions")))
PY
)
# shellcheck disable=SC2086  # one argument per pinned package
bash ../shared/tools/device-wheels.sh $versions
python3 - <<'PY'
import glob, os, zipfile
unused = ("ray/rllib/", "ray/llm/")
wheel = glob.glob(".whl/ray-*.whl")[0]
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as kept:
    for item in source.infolist():
        if item.filename.startswith(unused):
            continue
        data = source.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):  # pip checks the listed files against the wheel
            data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(tuple(p.encode() for p in unused)))
        kept.writestr(item, data)
os.replace(wheel + ".tmp", wheel)
PY
echo "wheels and tracked files: $(( $(du -cb .whl/* | tail -n 1 | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1) )) bytes of the 67108864 a call carries"
