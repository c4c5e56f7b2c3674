#!/usr/bin/env bash
# Runs the whole test suite with the project's virtual environment (made by `make install`).
# pytest's exit code 5 means it collected no test: that is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if [ -x tests/integration/kube/build-apiserver.sh ] && [ -z "${FLYTE_ACTORS_SKIP_KUBE:-}" ]; then
  # The Kubernetes tier needs a kube-apiserver built from Debian's source (cached after the first build).
  if ! bash tests/integration/kube/build-apiserver.sh >/dev/null; then
    echo "run-tests: kube-apiserver could not be built; the Kubernetes tier will be skipped" >&2
  fi
fi

"$PY" -m pytest tests -p no:cacheprovider -q -rs "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run-tests: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
