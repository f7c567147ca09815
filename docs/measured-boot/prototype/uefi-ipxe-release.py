"""Step 7 of the study (2026-12-04): the fleet's path under UEFI, end to end.

OVMF with Secure Boot (a provider key as PK, KEK and db) starts Debian 12's ipxe.efi (package
`ipxe`, /boot/ipxe.efi, 1.0.0+git-20190125) signed with that key (QEMU -kernel; the NIC's
unsigned option ROM off: romfile=), iPXE DHCPs, fetches boot.ipxe over HTTP and chains the
build's own amnesiac.efi, signed with the same key and otherwise unchanged; the image asks
the release service for its identity, which sends it only for PCR 7 as predicted from the
enrolled variables, PCR 11 as the manifest predicts (no test overlay at all) and PCR 12 zero.

Run from the repository with PYTHONPATH=. after building build/ovpn_release with the release
variables of tests/images.py (release_args; its keys in build/ovpn_release.keys/) and
`apt-get download ipxe && dpkg-deb -x ipxe_*.deb /tmp/uefi-exp/ipxe-pkg`."""
import shutil, subprocess, sys, time
from pathlib import Path
from amnesiac import attest
from amnesiac.boot.firmware import find_ovmf
from amnesiac.boot.http import FileServer, Source
from amnesiac.image import secure_boot
from amnesiac.image.manifest import Manifest
from amnesiac.provider.release import IdentityRelease, server
from amnesiac.flash import identities
from tests.images import release_setup
from tests.boot.release import MAC, NODE
from tests.test_flash_identities import identity_dir

build = Path("/work/main/build/ovpn_release")
work = Path("/tmp/uefi-exp/run"); shutil.rmtree(work, ignore_errors=True); work.mkdir()
key = secure_boot.throwaway_key(work)
ipxe = work / "ipxe.efi"; shutil.copy("/tmp/uefi-exp/ipxe-pkg/boot/ipxe.efi", ipxe); secure_boot.sign(ipxe, key)
uki = work / "amnesiac.efi"; shutil.copy(build / "amnesiac.efi", uki); secure_boot.sign(uki, key)
_, template = find_ovmf()
variables = work / "VARS.fd"; secure_boot.enrolled_variables(template, key, variables)
pcr7 = secure_boot.expected_pcr7(variables, key)
tpm = attest.SoftwareTpm(work / "tpm"); tpm.create()
with tpm.serving() as tcti:
    ak = attest.derive_ak(tcti); ek = attest.ek_pem(attest.derive_ek(tcti))
enrolment = attest.Enrolment(ak_pem=ak.decode(), pcr7=pcr7, ek_pem=ek.decode())
manifest = Manifest.load(build)
pki, _ = release_setup(Path("/work/main/build/ovpn_release.keys"))
source = identity_dir(work / "ids", {MAC: NODE}, wireguard=False)
files = identities.load(source).host_files[MAC]
script = b"#!ipxe\necho amnesiac: chaining the UKI\nchain http://10.0.2.100/amnesiac.efi\n"
sock = work / "swtpm.sock"
swtpm = tpm.qemu_socket(sock)
time.sleep(1)
with FileServer({"boot.ipxe": Source(data=script), "amnesiac.efi": Source(path=uki)}) as http, \
        IdentityRelease(pki, {MAC: server(MAC, manifest, enrolment, files)}) as release:
    relay = "/bin/busybox"
    argv = ["qemu-system-x86_64", "-machine", "q35,graphics=off,smm=on", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1536",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-global", "driver=cfi.pflash01,property=secure,value=on",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={secure_boot.OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
            "-chardev", f"socket,id=chrtpm,path={sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0",
            "-kernel", str(ipxe),
            "-chardev", f"file,id=serial0,path={work}/serial.log", "-serial", "chardev:serial0",
            "-netdev", f"user,id=n0,restrict=on,bootfile=http://10.0.2.100/boot.ipxe,guestfwd=tcp:10.0.2.100:80-cmd:{relay} nc 127.0.0.1 {http.port},guestfwd=tcp:10.0.2.103:443-cmd:{relay} nc 127.0.0.1 {release.port}",
            "-device", "virtio-net-pci,netdev=n0,romfile="]
    start = time.monotonic()
    q = subprocess.Popen(argv, stdout=open(work / "qemu.out", "w"), stderr=subprocess.STDOUT)
    try:
        while time.monotonic() - start < 600:
            log = (work / "serial.log").read_text(errors="replace") if (work / "serial.log").exists() else ""
            if "amnesiac: identity release:" in log or q.poll() is not None:
                time.sleep(2); break
            time.sleep(2)
        print("seconds", round(time.monotonic() - start), "qemu", q.poll())
        print("served", [r.as_dict() for r in http.records()])
        print("release", [(r.path, r.status) for r in release.requests()])
    finally:
        q.terminate(); q.wait(10); swtpm.terminate()
