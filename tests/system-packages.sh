#!/usr/bin/env bash
# The Debian packages the tests drive: prometheus (the server and promtool the metrics tests
# run), chromium (the browser Playwright drives; Playwright's own browser download fails
# offline), wrk (the benchmarks' load generator), opencv-doc (its 5,000 real handwritten
# digits are the training report's near-miss set), podman, runc and debootstrap (the images
# are built and run as Kubernetes would run them), postgresql (the prediction log's tests start
# their own server) and haproxy (the round-robin Service in front of several replicas); or the
# packages named as arguments. Installed with apt-get when this runs as root; otherwise it names the one command to run and fails, so that
# `make test` never silently skips what CI runs.
set -euo pipefail

PACKAGES=("$@")
[ ${#PACKAGES[@]} -gt 0 ] || PACKAGES=(prometheus chromium wrk opencv-doc podman runc debootstrap postgresql haproxy)
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "these Debian packages are needed and not installed: ${missing[*]}" >&2
    echo "run: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
