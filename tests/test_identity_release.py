"""Identity released after attestation, end to end on this machine: the provider's release
service (amnesiac.provider.release) on 127.0.0.1, and the node's own script (provider_agent's
identity-release, rendered as the role renders it) run with bash, curl and the image's TPM tool
against swtpm. The identity reaches the node only when its TPM quotes the build's PCRs with its
enrolled AK, and only that TPM can open the credential that carries the token for it."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from amnesiac import attest
from amnesiac.enrol import enrol_host
from amnesiac.errors import UsageError
from amnesiac.flash import identities
from amnesiac.provider.pki import ProviderPki
from amnesiac.provider.release import IdentityRelease, Server, bundle, servers
from amnesiac.provider.service import REDACTED
from tests.role_templates import ROLES, render
from tests.test_flash_identities import identity_dir
from tests.tpm import QUOTE_TOOL, SECTIONS, SwtpmHost, a_public_key, built, extend, extend_pcr11, software_tpm

MAC = "52-54-00-12-34-56"
UNPACK = ROLES / "provider_agent/files/identity-unpack"
ROLE_VARS = ROLES / "provider_agent/vars/main.yml"


@dataclass(frozen=True)
class Provider:
    pki: ProviderPki
    fleet: dict[str, Server]
    source: Path  # the operator's identity directory


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> attest.SoftwareTpm:
    return software_tpm(tmp_path_factory.mktemp("swtpm"))


@pytest.fixture(scope="module")
def provider(tpm: attest.SoftwareTpm, tmp_path_factory: pytest.TempPathFactory) -> Provider:
    """The provider after enrolling this TPM (`amnesiac enrol`'s own path) for MAC's identity."""
    with tpm.serving() as tcti:
        enrolment = enrol_host(SwtpmHost(tcti), secure_boot=None).enrolment
    source = identity_dir(tmp_path_factory.mktemp("identities"), {MAC: "vpn1"})
    fleet = servers(built(SECTIONS), {MAC: enrolment}, identities.load(source))
    return Provider(ProviderPki.create(["127.0.0.1"]), fleet, source)


@pytest.fixture
def release(provider: Provider) -> Iterator[IdentityRelease]:
    with IdentityRelease(provider.pki, provider.fleet) as service:
        yield service


def node(
    tmp_path: Path, service: IdentityRelease, tcti: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The node's identity-release script, rendered as the role renders it, its TPM swtpm's port
    and its root a directory with the image's (empty) identity directories; it runs to the end."""
    root = tmp_path / "root"
    for directory in identities.IDENTITY_DIRS:
        (root / directory).mkdir(parents=True, mode=0o700)
    release_dir = tmp_path / "release"
    release_dir.mkdir()
    (release_dir / "url").write_text(service.url + "\n")
    (release_dir / "ca.crt").write_bytes(service.pki.ca.cert)
    tool = tmp_path / "amnesiac-tpm-quote"  # the image's tool, as the role installs it: executable
    tool.write_text(f'#!/bin/sh\nexec perl {QUOTE_TOOL} "$@"\n')
    tool.chmod(0o755)
    script = tmp_path / "identity-release"
    script.write_text(
        render(
            "provider_agent",
            "identity-release.sh.j2",
            provider_agent__release_dir=str(release_dir),
            provider_agent__quote_tool=str(tool),
            provider_agent__tpm="127.0.0.1:" + tcti.rsplit("port=", 1)[1],
            provider_agent__identity_unpack=str(UNPACK),
            provider_agent__identity_root=str(root),
            provider_agent__release_tries=2,
        )
    )
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, check=False)
    return done, root


def released(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_the_booted_image_gets_its_identity(
    tpm: attest.SoftwareTpm, provider: Provider, release: IdentityRelease, tmp_path: Path
) -> None:
    with tpm.serving() as tcti:
        extend_pcr11(tcti, SECTIONS)  # what systemd-stub does when it boots the build's UKI
        done, root = node(tmp_path, release, tcti)
    assert done.returncode == 0, done.stdout + done.stderr
    want = {f.path: (f.data, f.mode) for f in identities.load(provider.source).host_files[MAC]}
    assert released(root) == want
    assert {path.rsplit("/", 1)[0] for path in want} == {"etc/amnesiac/provider", "etc/wireguard/identity"}
    assert done.stdout.strip() == f"amnesiac: identity release: {len(want)} files from {release.url}"
    answered = [(r.path, r.status) for r in release.requests()]
    assert answered == [("/v1/identity/challenge", 200), ("/v1/identity/quote", 200), ("/v1/identity", 200)]
    tokens = [value for r in release.requests() for name, value in r.fields if name == "token"]
    assert tokens == [REDACTED]  # the token is a secret: never journaled


def test_another_kernel_command_line_gets_nothing(
    tpm: attest.SoftwareTpm, release: IdentityRelease, tmp_path: Path
) -> None:
    with tpm.serving() as tcti:
        extend_pcr11(tcti, {**SECTIONS, ".cmdline": b"quiet init=/bin/sh"})
        done, root = node(tmp_path, release, tcti)
    assert done.returncode == 1
    assert "refused the quote: not attested: PCR 11 is" in done.stdout, done.stdout + done.stderr
    assert released(root) == {}
    assert [(r.path, r.status) for r in release.requests()][-1] == ("/v1/identity/quote", 403)


def test_a_service_out_of_reach_is_tried_a_bounded_number_of_times(
    tpm: attest.SoftwareTpm, provider: Provider, tmp_path: Path
) -> None:
    with IdentityRelease(provider.pki, provider.fleet) as gone:
        pass  # closed: its port refuses
    with tpm.serving() as tcti:
        done, root = node(tmp_path, gone, tcti)
    assert done.returncode == 1
    assert done.stdout.strip().endswith("not reached (curl exit 7)"), done.stdout + done.stderr
    assert released(root) == {}


def test_a_tpm_the_provider_did_not_enrol_gets_nothing(release: IdentityRelease, tmp_path: Path) -> None:
    stranger = software_tpm(tmp_path / "swtpm")
    with stranger.serving() as tcti:
        extend_pcr11(tcti, SECTIONS)
        done, root = node(tmp_path, release, tcti)
    assert done.returncode == 1
    assert "no challenge from" in done.stdout and "no identity for this TPM" in done.stdout, done.stdout
    assert released(root) == {}


def test_a_relayed_quote_gets_a_credential_only_the_enrolled_tpm_opens(
    tpm: attest.SoftwareTpm, provider: Provider, release: IdentityRelease, tmp_path: Path
) -> None:
    """An impostor that relays the enrolled server's quote (a root shell on it could make one)
    gets a credential, but its own TPM cannot open it: the token stays the enrolled TPM's."""
    ((host, server),) = provider.fleet.items()
    nonce = release.challenge(host)
    with tpm.serving() as tcti:
        extend_pcr11(tcti, SECTIONS)
        answer = SwtpmHost(tcti).run(attest.guest_command(nonce)).stdout
    credential = release.attest(host, answer)
    assert isinstance(credential, tuple), credential
    impostor = software_tpm(tmp_path / "swtpm")
    with impostor.serving() as tcti:
        opened = SwtpmHost(tcti).run(attest.activate_command(credential))
    assert opened.rc != 0 and "credential" not in opened.stdout
    with tpm.serving() as tcti:
        token = attest.guest_parts(
            SwtpmHost(tcti).run(attest.activate_command(credential)).stdout, ["credential"]
        )
    assert release.release(host, token["credential"]) == server.files
    assert release.release(host, token["credential"]) is None  # once


def test_a_challenge_and_a_token_are_used_once_and_in_time(
    tpm: attest.SoftwareTpm, provider: Provider, tmp_path: Path
) -> None:
    now = [0.0]
    ((host, _),) = provider.fleet.items()
    with IdentityRelease(provider.pki, provider.fleet, clock=lambda: now[0]) as service:
        nonce = service.challenge(host)
        with tpm.serving() as tcti:
            extend_pcr11(tcti, SECTIONS)
            answer = SwtpmHost(tcti).run(attest.guest_command(nonce)).stdout
        assert isinstance(service.attest(host, answer), tuple)
        assert "no challenge" in str(service.attest(host, answer))  # the same quote again
        service.challenge(host)
        now[0] += 3600
        assert "expired" in str(service.attest(host, answer))
        assert service.release(host, b"\0" * 32) is None


def test_an_enrolment_gives_back_the_tpms_public_areas(tpm: attest.SoftwareTpm, provider: Provider) -> None:
    """What the service makes the credential for is the TPM's own EK and AK, byte for byte."""
    with tpm.serving() as tcti:
        keys = attest.TpmKeys.parse(SwtpmHost(tcti).run(attest.keys_command()).stdout)
        harness = attest.derive_ek(tcti)  # as the boot harness reads it before a boot, with tpm2-tools
    (server,) = provider.fleet.values()
    assert (server.keys.ek_public, server.keys.ak_public) == (keys.ek_public, keys.ak_public)
    assert harness == keys.ek_public


def test_the_unpacker_writes_all_or_nothing_and_replaces_nothing(tmp_path: Path) -> None:
    dirs = ["etc/amnesiac/provider", "etc/wireguard/identity"]
    for directory in dirs:
        (tmp_path / directory).mkdir(parents=True)

    def unpack(text: str) -> subprocess.CompletedProcess[str]:
        argv = ["perl", str(UNPACK), str(tmp_path), *dirs]
        return subprocess.run(argv, input=text, capture_output=True, text=True, check=False)

    good = "== etc/amnesiac/provider/url 644\n" + b"https://x\n".hex() + "\n"
    refused = {
        "outside": good + "== etc/passwd 644\n00\n",
        "up and out": good + "== etc/amnesiac/provider/../../../x 644\n00\n",
        "a hidden name": good + "== etc/wireguard/identity/.x 600\n00\n",
        "set-uid": good + "== etc/wireguard/identity/k 4755\n00\n",
        "not hex": good + "== etc/wireguard/identity/k 600\nzz\n",
        "cut short": good + "== etc/wireguard/identity/k 600\n",
        "twice": good + good,
        "empty": "",
    }
    for why, text in refused.items():
        done = unpack(text)
        assert done.returncode == 1, why
        assert released(tmp_path) == {}, why
    assert unpack(good).returncode == 0
    again = unpack("== etc/wireguard/identity/k 600\n00\n" + good)
    assert again.returncode == 1 and "nothing is replaced" in again.stderr
    assert released(tmp_path) == {"etc/amnesiac/provider/url": (b"https://x\n", 0o644)}


def test_the_role_unpacks_into_the_identity_directories_flash_delivers() -> None:
    role = yaml.safe_load(ROLE_VARS.read_text())["provider_agent__identity_dirs"]
    assert tuple(role) == identities.IDENTITY_DIRS


def test_the_bundle_is_what_the_unpacker_reads(provider: Provider) -> None:
    (server,) = provider.fleet.values()
    text = bundle(server.files)
    assert text.count("\n== ") + 1 == len(server.files) and text.endswith("\n")


def test_hosts_without_an_enrolment_or_an_ek_are_refused(tmp_path: Path) -> None:
    source = identity_dir(tmp_path / "ids", {MAC: "vpn1", "52-54-00-00-00-02": "vpn2"})
    with pytest.raises(UsageError, match="52-54-00-00-00-02: no enrolment"):
        servers(built(SECTIONS), {}, identities.load(source))
    hand_made = attest.Enrolment(ak_pem=a_public_key(), pcr7="0" * 64)
    with pytest.raises(UsageError, match="no ek_pem"):
        servers(
            built(SECTIONS), dict.fromkeys([MAC, "52-54-00-00-00-02"], hand_made), identities.load(source)
        )


def test_pcr7_must_be_the_enrolled_one(
    tpm: attest.SoftwareTpm, release: IdentityRelease, tmp_path: Path
) -> None:
    """Firmware whose Secure Boot policy changed after enrolment (PCR 7) gets nothing either."""
    with tpm.serving() as tcti:
        extend(tcti, 7, b"Secure Boot turned off")
        extend_pcr11(tcti, SECTIONS)
        done, root = node(tmp_path, release, tcti)
    assert done.returncode == 1 and "PCR 7 is" in done.stdout, done.stdout
    assert released(root) == {}
    assert list((root / "etc/amnesiac/provider").iterdir()) == []
