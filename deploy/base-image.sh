#!/usr/bin/env bash
# The base image of both images (serving and training) made offline from Debian's packages:
# Debian bookworm (Python 3.11) with python3, pip and the CA certificates, bootstrapped with
# debootstrap from the Debian mirror this machine's apt already uses, and imported into podman.
# Built once: an image of that name already there is kept (--rebuild makes it again).
#
# Usage: deploy/base-image.sh [--name NAME] [--suite SUITE] [--mirror URL] [--rebuild]
#                             [--print-mirror]
#   MIRROR (or --mirror) overrides the mirror read from apt's sources; --print-mirror prints the
#   mirror it would use and stops (APT_ROOT=DIR reads DIR/etc/apt/... instead).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/containers.conf}"

NAME="${BASE_IMAGE:-localhost/image-classifier-base:bookworm}"
SUITE=bookworm # Python 3.11, the version the project pins
MIRROR="${MIRROR:-}"
REBUILD=0
PRINT_MIRROR=0
APT_ROOT="${APT_ROOT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --name) NAME="$2"; shift 2 ;;
        --suite) SUITE="$2"; shift 2 ;;
        --mirror) MIRROR="$2"; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        --print-mirror) PRINT_MIRROR=1; shift ;;
        -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "base-image.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done


# The Debian archive apt uses here: the first `deb` source serving this machine's own release
# (its codename from /etc/os-release), in the one-line (*.list) or deb822 (*.sources) format.
debian_mirror() {
    local codename file
    codename="$(. "$APT_ROOT/etc/os-release" && echo "${VERSION_CODENAME:-}")"
    for file in "$APT_ROOT"/etc/apt/sources.list "$APT_ROOT"/etc/apt/sources.list.d/*.list \
        "$APT_ROOT"/etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk -v codename="$codename" -v deb822="$([[ $file == *.sources ]] && echo 1)" '
            function take(uri, suites,    n, i, s) {
                n = split(suites, s, /[ \t]+/)
                for (i = 1; i <= n; i++) if (s[i] == codename && uri != "") print uri
            }
            function stanza() {
                if (types ~ /(^| )deb( |$)/ && enabled != "no") take(uris, suites)
                types = uris = suites = enabled = ""
            }
            # one-line format: deb [options] URI SUITE COMPONENTS...
            !deb822 && $1 == "deb" {
                line = $0; sub(/\[[^]]*\]/, "", line); split(line, f, /[ \t]+/); take(f[2], f[3])
            }
            # deb822 format: stanzas of fields, separated by blank lines
            deb822 && /^[ \t]*$/ { stanza(); next }
            deb822 && tolower($1) == "types:" { types = $0; sub(/^[^:]*:[ \t]*/, "", types) }
            deb822 && tolower($1) == "uris:" { uris = $2 }
            deb822 && tolower($1) == "suites:" { suites = $0; sub(/^[^:]*:[ \t]*/, "", suites) }
            deb822 && tolower($1) == "enabled:" { enabled = tolower($2) }
            END { if (deb822) stanza() }
        ' "$file"
    done
}

if [ -z "$MIRROR" ]; then
    MIRROR="$(debian_mirror | head -n 1)"
fi
if [ -z "$MIRROR" ]; then
    echo "base-image.sh: no Debian mirror found in apt's sources; give one: MIRROR=<url> make image" >&2
    exit 1
fi
[ "$PRINT_MIRROR" = 0 ] || { echo "$MIRROR"; exit 0; }

if [ "$REBUILD" = 0 ] && podman image exists "$NAME"; then
    echo "base image $NAME: already built (--rebuild to make it again)"
    exit 0
fi
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || {
        echo "base-image.sh: $tool is not installed; run: apt-get install -y podman debootstrap" >&2
        exit 1
    }
done

rootfs="$(mktemp -d)"
cleanup() {
    # debootstrap mounts /proc and /sys in the tree while it runs: never delete through them.
    grep -o " $rootfs/[^ ]*" /proc/mounts | sort -r | xargs -r -n 1 umount -l 2>/dev/null || true
    rm -rf --one-file-system "$rootfs" "$rootfs.log"
}
trap cleanup EXIT
keyring=()
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] &&
    keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
echo "base image $NAME: debootstrap $SUITE from apt's Debian mirror"
started=$SECONDS
# python-is-python3: `python` on PATH, as the Jobs' commands call it.
debootstrap --variant=minbase "${keyring[@]}" \
    --include=python3,python3-pip,python-is-python3,ca-certificates \
    "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    exit 1
}
# What an image never needs: the downloaded packages, apt's lists, documentation but the
# licences, manual pages and translations.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
find "$rootfs"/usr/share/doc -mindepth 2 -not -name copyright -not -type d -delete
# Debian's Python refuses pip installs outside a virtualenv (PEP 668) unless told so.
tar -C "$rootfs" -c . | podman import --quiet \
    --change "ENV PIP_BREAK_SYSTEM_PACKAGES=1" \
    --change "ENV LANG=C.UTF-8" \
    --change 'CMD ["python3"]' \
    - "$NAME" >/dev/null
size="$(podman image inspect --format '{{.Size}}' "$NAME" | numfmt --to=si)"
echo "base image $NAME: built in $((SECONDS - started)) s, $size"
