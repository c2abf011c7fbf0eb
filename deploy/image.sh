#!/usr/bin/env bash
# Build the project's OCI images with podman, offline but for the Python package index:
#   serving   the Bento (bentoml containerize --backend podman): image-classifier:latest and
#             image-classifier:<bento version>
#   training  training/Dockerfile: image-classifier-training:latest
# Both start FROM the local Debian base image (deploy/base-image.sh, made once).
#
# Usage: deploy/image.sh serving|training [options]
#   --bento TAG        the Bento to containerize (default image-classifier:latest)
#   --tag NAME:TAG     the image's one name (default: the names above)
#   --base-image NAME  start from NAME instead of the local base image (e.g. python:3.11-slim
#                      from a registry); the local one is then not built
#   --ca-bundle FILE   PEM bundle of the certificate authorities that HTTPS from inside the build
#                      must trust (a proxy's own CA among them); default: this machine's bundle;
#                      "none" to mount nothing. Also CA_BUNDLE=FILE.
# Environment: CONTAINERS_CONF (default deploy/containers.conf), BASE_IMAGE, CA_BUNDLE.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/containers.conf}"

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -gt 0 ] || { usage >&2; exit 2; }
KIND="$1"
shift
TAG=
case "$KIND" in
    serving | training) ;;
    -h | --help) usage; exit 0 ;;
    *) echo "image.sh: build 'serving' or 'training', not '$KIND' (see --help)" >&2; exit 2 ;;
esac
BENTO=image-classifier:latest
LOCAL_BASE=localhost/image-classifier-base:bookworm
BASE="${BASE_IMAGE:-}"
CA="${CA_BUNDLE:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --bento) BENTO="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --base-image) BASE="$2"; shift 2 ;;
        --ca-bundle) CA="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "image.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The CA bundle replaces the image's own for the build's RUN steps only (never in a layer);
# SSL_CERT_FILE, a build argument, points pip and uv at it.
build_args=(--build-arg "BASE_IMAGE=$BASE")
if [ -z "$CA" ]; then
    for candidate in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
        [ -f "$candidate" ] && { CA="$candidate"; break; }
    done
fi
if [ -n "$CA" ] && [ "$CA" != none ]; then
    [ -f "$CA" ] || { echo "image.sh: --ca-bundle $CA: no such file" >&2; exit 2; }
    CA="$(realpath "$CA")"
    build_args+=(--volume "$CA:/etc/ssl/certs/ca-certificates.crt:ro"
        --build-arg "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
fi

command -v podman >/dev/null || {
    echo "image.sh: podman is not installed; run: apt-get install -y podman runc debootstrap" >&2
    exit 1
}
if [ -z "$BASE" ]; then
    bash deploy/base-image.sh --name "$LOCAL_BASE"
    BASE="$LOCAL_BASE"
fi
build_args[1]="BASE_IMAGE=$BASE"

started=$SECONDS
if [ "$KIND" = serving ]; then
    BENTOML="$(realpath "${BENTOML:-.venv/bin/bentoml}")"
    version="$("$BENTOML" get "$BENTO" -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])')"
    opts=()
    for ((i = 0; i < ${#build_args[@]}; i += 2)); do
        opts+=(--opt "${build_args[i]#--}=${build_args[i + 1]}")
    done
    # From /: BentoML 1.4 refuses a dockerfile_template outside the working directory, and it
    # unpacks the Bento to a temporary folder (bentoml/BentoML#5566).
    tags=(--image-tag "${TAG:-image-classifier:latest}")
    [ -n "$TAG" ] || tags+=(--image-tag "image-classifier:$version")
    (cd / && "$BENTOML" containerize "$BENTO" --backend podman "${tags[@]}" "${opts[@]}")
else
    podman build --file training/Dockerfile --tag "${TAG:=image-classifier-training:latest}" \
        "${build_args[@]}" .
fi
TAG="${TAG:-image-classifier:latest}"
size="$(podman image inspect --format '{{.Size}}' "$TAG" | numfmt --to=si)"
echo "image $TAG: built in $((SECONDS - started)) s from $BASE, $size"
