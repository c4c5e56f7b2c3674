#!/usr/bin/env bash
# Ensure a kube-apiserver binary (built from Debian bookworm's `kubernetes` 1.20.2 source package) and Debian's
# etcd are present, then print the binary's path. Idempotent; needs root and network access to the Debian mirror.
# A build takes 7-9 minutes on 2 cores; its log goes to $CACHE/build-apiserver.log. Binaries already in place (a
# kube-apiserver at $CACHE/bin/kube-apiserver, etcd on PATH) need neither; without them and without root and
# apt-get it fails at once, with one line saying so.
set -euo pipefail

CACHE="${FLYTE_ACTORS_CACHE:-$HOME/.cache/flyte-actors}"
BIN="$CACHE/bin/kube-apiserver"
LOG="$CACHE/build-apiserver.log"
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$CACHE/bin"

if [[ -x "$BIN" ]] && command -v etcd >/dev/null; then
    echo "$BIN"
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "build-apiserver: no kube-apiserver at $BIN (or no etcd on PATH), and building one needs root and apt-get" >&2
    exit 1
fi

fail() {
    echo "build-apiserver: $1 (log: $LOG)" >&2
    tail -n 30 "$LOG" >&2
    exit 1
}

# Install the Debian packages among "$@" that are not installed yet.
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    echo "build-apiserver: installing ${missing[*]}" >&2
    apt-get update >>"$LOG" 2>&1 || fail "apt-get update failed"
    apt-get install -y --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1 || fail "apt-get install failed"
}

# Add a deb-src entry for bookworm unless apt already has one. It copies the entry apt uses for bookworm's binary
# packages (same URIs and Signed-By: apt rejects two entries for one source with different Signed-By values).
ensure_deb_src() {
    apt-get update >>"$LOG" 2>&1 || fail "apt-get update failed"  # indextargets only knows fetched lists
    [[ -n "$(apt-get indextargets 'Target-Of: deb-src' 'Release: bookworm')" ]] && return
    local entry file n
    entry=$(apt-get indextargets --format '$(SOURCESENTRY)' 'Target-Of: deb' 'Release: bookworm' | head -n1)
    [[ -n "$entry" ]] || fail "no apt entry for bookworm found"
    file=${entry%:*} n=${entry##*:}  # deb822 files: stanza number; one-line files: line number
    case "$file" in
        *.sources)
            awk -v n="$n" 'BEGIN { RS = "" } NR == n' "$file" \
                | sed -E 's/^Types:.*/Types: deb-src/; s/^Suites:.*/Suites: bookworm/' \
                > /etc/apt/sources.list.d/flyte-actors-deb-src.sources ;;
        *)
            sed -n "${n}p" "$file" | sed -E 's/^deb[[:space:]]/deb-src /' \
                > /etc/apt/sources.list.d/flyte-actors-deb-src.list ;;
    esac
    apt-get update >>"$LOG" 2>&1 || fail "apt-get update failed after adding deb-src"
}

: >"$LOG"
apt_install etcd-server
if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

apt_install golang-go build-essential dpkg-dev rsync
ensure_deb_src

WORK=$(mktemp -d "$CACHE/kube-src.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "build-apiserver: fetching and building kubernetes source in $WORK (7-9 minutes)" >&2
(cd "$WORK" && apt-get source kubernetes/bookworm) >>"$LOG" 2>&1 || fail "apt-get source kubernetes failed"
SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)

# The source package has no .git, so the binary would report v0.0.0-master; give it the real version (discovery
# clients such as helm read it). The Debian version is 1.20.5+really1.20.2-1.1+deb12u1.
VERSION=$(dpkg-parsechangelog -l "$SRC/debian/changelog" -SVersion | sed -E 's/-[^-]*$//; s/.*really//; s/[+~].*//')
cat >"$WORK/version.env" <<EOF
KUBE_GIT_VERSION='v$VERSION'
KUBE_GIT_MAJOR='${VERSION%%.*}'
KUBE_GIT_MINOR='$(cut -d. -f2 <<<"$VERSION")'
EOF

# Everything the Go build writes (module and build caches) stays under $WORK; vendor/ is complete, so no proxy.
(
    cd "$SRC"
    export GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" GOPROXY=off GOFLAGS=-mod=vendor
    export KUBE_GIT_VERSION_FILE="$WORK/version.env"
    make WHAT=cmd/kube-apiserver
) >>"$LOG" 2>&1 || fail "make WHAT=cmd/kube-apiserver failed"

install -m 0755 "$SRC/_output/bin/kube-apiserver" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"  # atomically: the check above must never find a half-copied binary
echo "$BIN"
