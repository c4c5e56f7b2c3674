#!/usr/bin/env bash
# Installs Debian's chromium (headless browser for tests/integration/test_status_page.py) when it is missing and
# this is root on an apt system; otherwise says why not and exits 0, and the browser test skips with that reason.
set -u
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium.sh: not root with apt-get; the status page browser test will skip (install chromium to run it)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be stale; one update, then the install. Failing here only skips the browser test.
if ! apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
  apt-get update -q >/dev/null 2>&1 || true
  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || echo "install-chromium.sh: apt-get install chromium failed; the status page browser test will skip"
fi
exit 0
