"""The image build scripts' choices made before anything is built: the Debian mirror read from
apt's sources (both formats), and the CA-bundle option."""

import subprocess

import pytest

from tests.helpers import ROOT


def mirror(root, environment=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "deploy/base-image.sh", "--print-mirror"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "APT_ROOT": str(root), **(environment or {})},
    )


@pytest.fixture
def apt_root(tmp_path):
    (tmp_path / "etc" / "apt" / "sources.list.d").mkdir(parents=True)
    (tmp_path / "etc" / "os-release").write_text('ID=debian\nVERSION_CODENAME="bookworm"\n')
    return tmp_path


def test_the_mirror_of_the_machines_own_release_from_a_deb822_file(apt_root):
    (apt_root / "etc/apt/sources.list.d/other.sources").write_text(
        "Types: deb\nURIs: https://packages.example.org/apt\nSuites: nodistro\nComponents: main\n"
    )
    (apt_root / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example.org/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb deb-src\nURIs: http://mirror.example.org/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main"  # no newline at the end
    )
    result = mirror(apt_root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "http://mirror.example.org/debian"


def test_the_mirror_from_a_one_line_sources_list(apt_root):
    (apt_root / "etc/apt/sources.list").write_text(
        "# comment\ndeb-src http://src.example.org/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://list.example.org/debian "
        "bookworm main contrib\n"
    )
    assert mirror(apt_root).stdout.strip() == "http://list.example.org/debian"


def test_a_disabled_or_foreign_source_is_not_taken(apt_root):
    (apt_root / "etc/apt/sources.list.d/off.sources").write_text(
        "Types: deb\nURIs: http://off.example.org/debian\nSuites: bookworm\nEnabled: no\n"
    )
    (apt_root / "etc/apt/sources.list.d/gone.list.disabled").write_text(
        "deb http://gone.example.org/debian bookworm main\n"
    )
    result = mirror(apt_root)
    assert result.returncode == 1 and "MIRROR=<url>" in result.stderr
    assert mirror(apt_root, {"MIRROR": "http://given.example.org/debian"}).stdout.strip() == (
        "http://given.example.org/debian"
    )


def test_a_missing_ca_bundle_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        ["bash", "deploy/image.sh", "serving", "--ca-bundle", str(tmp_path / "corp.pem")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"image.sh: --ca-bundle {tmp_path / 'corp.pem'}: no such file"


def test_an_unknown_image_kind_is_refused():
    result = subprocess.run(
        ["bash", "deploy/image.sh", "server"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "build 'serving' or 'training'" in result.stderr
