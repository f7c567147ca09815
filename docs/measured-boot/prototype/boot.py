#!/usr/bin/env python3
"""Boot a UKI under OVMF + swtpm (TCG), over iPXE/HTTP (like amnesiac's harness) or QEMU -kernel.

Records when serial-console markers appear (seconds since QEMU start) and when sshd answers,
optionally runs a script in the guest over SSH and copies a directory back, then stops
everything it started. One QEMU at a time.
"""
import argparse, json, os, shutil, signal, socket, subprocess, sys, time
from pathlib import Path

P = Path("/work/mb-proto")
MARKERS = {
    "ovmf_bds": "BdsDxe",
    "ipxe": "iPXE initialising",
    "ipxe_loaded": "iPXE",
    "stub": "systemd-stub",
    "efi_stub": "EFI stub:",
    "linux": "Linux version",
    "init": "Run /init as init process",
    "systemd": "systemd[1]: ",
    "login": "login:",
}

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def banner(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(3); return s.recv(64).decode(errors="replace")
    except OSError:
        return ""

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ipxe", "httpboot-ipxe", "direct"], default="ipxe")
    ap.add_argument("--uki", required=True)
    ap.add_argument("--overlay", help="extra initrd (cpio) passed by the loader")
    ap.add_argument("--rom", help="iPXE ROM file for virtio-net (default: QEMU's own)")
    ap.add_argument("--tpm-state", required=True)
    ap.add_argument("--vars", help="OVMF VARS file to use (copied); default: a fresh OVMF_VARS_4M.fd")
    ap.add_argument("--code", default="/usr/share/OVMF/OVMF_CODE_4M.fd")
    ap.add_argument("--run", default=str(P / "run/boot"))
    ap.add_argument("--ssh-key", help="private key; its .pub must be in the overlay")
    ap.add_argument("--guest-script", help="shell script run as root in the guest after SSH")
    ap.add_argument("--fetch", help="guest dir copied back into RUN/fetched after the script")
    ap.add_argument("--append", help="command line passed by the loader (-append / iPXE chain args)")
    ap.add_argument("--memory", default="1024")
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--wait-for", default="ssh", choices=["ssh", "login", "marker"])
    ap.add_argument("--marker", default="")
    a = ap.parse_args()

    run = Path(a.run); shutil.rmtree(run, ignore_errors=True); run.mkdir(parents=True)
    srv = run / "srv"; srv.mkdir()
    procs = []
    result = {"mode": a.mode, "uki": a.uki, "overlay": a.overlay, "rom": a.rom}
    try:
        # swtpm on a unix socket, state in --tpm-state
        sock = run / "swtpm.sock"
        tpm = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={a.tpm_state}",
                                "--ctrl", f"type=unixio,path={sock}", "--log", f"file={run}/swtpm.log,level=1"])
        procs.append(tpm)
        for _ in range(50):
            if sock.exists(): break
            time.sleep(0.1)
        vars_ = run / "OVMF_VARS.fd"
        shutil.copy(a.vars or "/usr/share/OVMF/OVMF_VARS_4M.fd", vars_)
        ssh_port = free_port()
        netdev = ["user", "id=n0", "restrict=on", f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22"]
        extra = []
        if a.mode in ("ipxe", "httpboot-ipxe"):
            os.link(a.uki, srv / "uki.efi") if os.stat(a.uki).st_dev == os.stat(srv).st_dev else shutil.copy(a.uki, srv / "uki.efi")
            lines = ["#!ipxe", "echo amnesiac-proto: iPXE script running"]
            if a.overlay:
                shutil.copy(a.overlay, srv / "overlay.cpio")
                lines.append("initrd overlay.cpio")
            lines += [f"chain uki.efi {a.append or ''}".rstrip() + " || shell"]
            (srv / "boot.ipxe").write_text("\n".join(lines) + "\n")
            http_port = free_port()
            shutil.copy(P / "ipxe-trixie/usr/lib/ipxe/snponly.efi", srv / "snponly.efi")
            http = subprocess.Popen([sys.executable, str(P / "scripts/httpd.py"), str(srv), str(http_port)],
                                    stdout=open(run / "http.log", "w"), stderr=subprocess.STDOUT)
            procs.append(http)
            netdev += ["bootfile=http://10.0.2.100/" + ("boot" if a.mode == "httpboot-ipxe" else "boot.ipxe"),
                       f"guestfwd=tcp:10.0.2.100:80-cmd:/usr/bin/busybox nc 127.0.0.1 {http_port}"]
            nic = "virtio-net-pci,netdev=n0,bootindex=1" + (f",romfile={a.rom}" if a.rom else "")
            if a.mode == "httpboot-ipxe":
                nic = "virtio-net-pci,netdev=n0,bootindex=1,romfile="  # OVMF's own virtio-net driver + HTTP boot
        else:
            nic = "virtio-net-pci,netdev=n0,romfile="
            extra = ["-kernel", a.uki] + (["-initrd", a.overlay] if a.overlay else []) + (["-append", a.append] if a.append else [])
        serial = run / "serial.log"
        argv = ["qemu-system-x86_64", "-name", "mb-proto", "-machine", "q35,graphics=off,smm=on",
                "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", a.memory, "-nodefaults",
                "-display", "none", "-no-reboot",
                "-global", "driver=cfi.pflash01,property=secure,value=on",
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={a.code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_}",
                "-chardev", f"socket,id=chrtpm,path={sock}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0",
                "-chardev", f"file,id=serial0,path={serial}", "-serial", "chardev:serial0",
                "-netdev", ",".join(netdev), "-device", nic, *extra]
        result["qemu_argv"] = argv
        t0 = time.monotonic()
        q = subprocess.Popen(argv, stdout=open(run / "qemu.out", "w"), stderr=subprocess.STDOUT)
        procs.append(q)
        seen = {}
        ready = None
        while time.monotonic() - t0 < a.timeout:
            if q.poll() is not None:
                result["qemu_exit"] = q.returncode; break
            text = serial.read_bytes().decode(errors="replace") if serial.exists() else ""
            for k, m in MARKERS.items():
                if k not in seen and m in text:
                    seen[k] = round(time.monotonic() - t0, 1)
            if a.wait_for == "ssh" and time.monotonic() - t0 > 15 and banner(ssh_port).startswith("SSH-"):
                ready = round(time.monotonic() - t0, 1); break
            if a.wait_for == "login" and "login" in seen:
                ready = seen["login"]; break
            if a.wait_for == "marker" and a.marker in text:
                ready = round(time.monotonic() - t0, 1); break
            time.sleep(0.5)
        result["markers_s"] = seen
        result["ready_s"] = ready
        result["ssh_port"] = ssh_port
        if ready is not None and a.guest_script:
            ssh = ["ssh", "-i", a.ssh_key, "-p", str(ssh_port), "-o", "StrictHostKeyChecking=no",
                   "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                   "root@127.0.0.1"]
            t1 = time.monotonic()
            nonce = os.urandom(20).hex()  # fresh, made when the guest is up
            (run / "nonce.hex").write_text(nonce)
            script = open(a.guest_script).read().replace("@NONCE@", nonce).encode()
            r = subprocess.run(ssh + ["sh -s"], input=script, capture_output=True, timeout=600)
            (run / "guest.out").write_bytes(r.stdout); (run / "guest.err").write_bytes(r.stderr)
            result["guest_rc"] = r.returncode; result["guest_s"] = round(time.monotonic() - t1, 1)
            if a.fetch:
                f = run / "fetched"; f.mkdir()
                tar = subprocess.run(ssh + [f"tar -C {a.fetch} -cf - ."], capture_output=True, timeout=120)
                subprocess.run(["tar", "-C", str(f), "-xf", "-"], input=tar.stdout, check=False)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try: p.wait(10)
                except subprocess.TimeoutExpired: p.kill(); p.wait()
    (run / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "qemu_argv"}, indent=1))

if __name__ == "__main__":
    main()
