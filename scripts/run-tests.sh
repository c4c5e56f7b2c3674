#!/usr/bin/env bash
# Runs the test suite in two legs, each announced on one line:
#   newest: the project's venv (.venv, made by `make install`): the newest flytekit 1.16 and protobuf/grpcio the
#           ranges allow; the unit, local (process) and Kubernetes tiers.
#   oldest: .venv-oldest (made here, then reused while its requirements stay the same): Python 3.10, flytekit 1.14.0
#           and the SDK's floors (protobuf 4.25.1, grpcio 1.62.0); the SDK's unit tests (the agent needs 1.16).
# pytest's exit code 5 means it collected no test: that is a failure here, never a pass.
#
# Environment:
#   FLYTE_ACTORS_SKIP_KUBE=1   skip the Kubernetes tier: no kube-apiserver build, its tests skip.
#   FLYTE_ACTORS_OLDEST=auto   run the oldest leg where Python 3.10 is found and its venv can be built, else say so
#                              and go on (default); =require fails instead (CI); =0 skips it.
#   PYTHON_OLDEST=python3.10   the Python 3.10 interpreter for the oldest leg.
# Arguments are passed to pytest in the newest leg.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OLDEST_VENV=.venv-oldest
OLDEST_MODE=${FLYTE_ACTORS_OLDEST:-auto}
OLDEST_REQUIREMENTS=("flytekit==1.14.0" "protobuf==4.25.1" "grpcio==1.62.0" "kubernetes==29.0.0" "pytest>=8,<10"
  "pytest-timeout>=2.3,<3")
KUBE_HINT="to add it, run tests/integration/kube/build-apiserver.sh once as root (apt; 7-9 minutes), or put a \
kube-apiserver at ${FLYTE_ACTORS_CACHE:-$HOME/.cache/flyte-actors}/bin/kube-apiserver (FLYTE_ACTORS_CACHE moves it) \
and etcd on PATH"
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT

say() { echo "run-tests: $*" >&2; }

versions() {  # "Python X, flytekit Y, protobuf Z, grpcio W" of the interpreter $1
  "$1" - <<'EOF'
import platform
from importlib.metadata import version
print(f"Python {platform.python_version()}, " + ", ".join(f"{p} {version(p)}" for p in ("flytekit", "protobuf", "grpcio")))
EOF
}

pytest_leg() {  # name, python, pytest arguments...: run pytest, turning "no tests collected" into a failure
  local name=$1 py=$2 rc
  shift 2
  "$py" -m pytest -p no:cacheprovider -q -rs "$@"
  rc=$?
  if [ "$rc" -eq 5 ]; then
    say "$name leg: pytest collected no tests"
    rc=1
  fi
  return "$rc"
}

# --------------------------------------------------------------------------------------------- the oldest leg's venv
oldest_python() {
  local py
  for py in "${PYTHON_OLDEST:-python3.10}" "$HOME"/.pyenv/versions/3.10.*/bin/python; do
    if "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

# Build .venv-oldest unless it has the same requirements already (the stamp); the SDK is installed editable, so code
# changes need no reinstall. Runs in the background while the newest leg runs; its log is $LOGS/oldest-venv.log.
build_oldest_venv() {
  local py=$1 stamp
  stamp=$(printf '%s\n' "$("$py" -V 2>&1)" "${OLDEST_REQUIREMENTS[@]}" | cat - flytekitplugins-actor/setup.py | sha256sum)
  if [ -x "$OLDEST_VENV/bin/python" ] && [ "$(cat "$OLDEST_VENV/.requirements-stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  rm -rf "$OLDEST_VENV"
  "$py" -m venv "$OLDEST_VENV" &&
    "$OLDEST_VENV/bin/python" -m pip install -q --upgrade pip &&
    "$OLDEST_VENV/bin/python" -m pip install -q -e ./flytekitplugins-actor "${OLDEST_REQUIREMENTS[@]}" &&
    echo "$stamp" >"$OLDEST_VENV/.requirements-stamp"
}

oldest_pid=""
oldest_skip=""
case "$OLDEST_MODE" in
  0 | no | off) oldest_skip="FLYTE_ACTORS_OLDEST=$OLDEST_MODE" ;;
  auto | require)
    if python310=$(oldest_python); then
      build_oldest_venv "$python310" >"$LOGS/oldest-venv.log" 2>&1 &
      oldest_pid=$!
    else
      oldest_skip="no Python 3.10 found: set PYTHON_OLDEST to one"
    fi ;;
  *) say "FLYTE_ACTORS_OLDEST=$OLDEST_MODE is not a mode: use auto, require or 0"; exit 2 ;;
esac

# ------------------------------------------------------------------------------------------ the Kubernetes tier
if [ -n "${FLYTE_ACTORS_SKIP_KUBE:-}" ]; then
  say "Kubernetes tier skipped (FLYTE_ACTORS_SKIP_KUBE is set); $KUBE_HINT"
else
  say "Kubernetes tier: looking for kube-apiserver (a first build takes 7-9 minutes; FLYTE_ACTORS_SKIP_KUBE=1 skips it)"
  if apiserver=$(bash tests/integration/kube/build-apiserver.sh 2>"$LOGS/kube.log"); then
    say "Kubernetes tier: kube-apiserver at $apiserver"
  else
    reason=$(grep '^build-apiserver: ' "$LOGS/kube.log" | tail -n1 | sed 's/^build-apiserver: //')
    say "Kubernetes tier skipped (${reason:-build-apiserver.sh failed}); $KUBE_HINT"
  fi
fi

# The status page's browser test needs Debian's chromium; without root and apt it skips with one line.
bash tests/integration/install-chromium.sh >&2

# ------------------------------------------------------------------------------------------------------ the legs
say "[1/2] newest leg: $(versions "$PY"): unit, local and Kubernetes tiers"
pytest_leg newest "$PY" tests "$@"
newest_rc=$?

oldest_rc=0
if [ -n "$oldest_pid" ]; then
  if wait "$oldest_pid"; then
    # The SDK's unit tests: those that do not import the agent, which needs flytekit 1.16 (its connector API) and
    # is not installed here.
    mapfile -t sdk_tests < <(grep -LE '^\s*(from|import) flyte_actor_agent' tests/unit/test_*.py)
    say "[2/2] oldest leg: $(versions "$OLDEST_VENV/bin/python"): the SDK's unit tests (${#sdk_tests[@]} modules)"
    pytest_leg oldest "$OLDEST_VENV/bin/python" "${sdk_tests[@]}"
    oldest_rc=$?
  else
    tail -n 20 "$LOGS/oldest-venv.log" >&2
    oldest_skip="its venv could not be built (pip output above)"
  fi
fi
if [ -n "$oldest_skip" ]; then
  if [ "$OLDEST_MODE" = require ]; then
    say "[2/2] oldest leg FAILED: $oldest_skip (FLYTE_ACTORS_OLDEST=require)"
    oldest_rc=1
  else
    say "[2/2] oldest leg skipped: $oldest_skip"
  fi
fi

if [ "$newest_rc" -ne 0 ] || [ "$oldest_rc" -ne 0 ]; then
  say "FAILED: newest leg exit $newest_rc, oldest leg exit $oldest_rc"
  exit 1
fi
say "passed"
