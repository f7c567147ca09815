# The two commands of the README, for a fresh Debian machine as root:
#   make build   installs everything and builds the default image into build/ovpn
#   make test    installs everything and runs every test tier (molecule included)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
POLICY ?= policies/ovpn.yml
OUT ?= build/ovpn
# One rootfs cache for `make build`, `make test` and the benchmarks.
export AMNESIAC_CACHE ?= $(CURDIR)/build/cache

# Debian packages the tool runs: command -> package.
HOST_TOOLS := mmdebstrap:mmdebstrap zstd:zstd cpio:cpio chroot:coreutils dpkg-query:dpkg \
	qemu-system-x86_64:qemu-system-x86 podman:podman runc:runc busybox:busybox-static \
	ssh:openssh-client ssh-keygen:openssh-client scp:openssh-client chromium:chromium \
	flock:util-linux wipefs:util-linux sfdisk:fdisk mkfs.vfat:dosfstools mcopy:mtools \
	openvpn:openvpn ip:iproute2 wireguard-go:wireguard-go wg:wireguard-tools \
	diffoscope:diffoscope-minimal swtpm:swtpm swtpm_setup:swtpm-tools tpm2_checkquote:tpm2-tools \
	sbsign:sbsigntool
HOST_FILES := /usr/lib/ipxe/qemu/efi-virtio.rom:ipxe-qemu /usr/share/doc/python3-venv:python3-venv \
	/usr/lib/systemd/boot/efi/systemd-bootx64.efi:systemd-boot-efi /usr/share/OVMF/OVMF_CODE_4M.fd:ovmf \
	/usr/sbin/sshd:openssh-server /usr/lib/x86_64-linux-gnu/libtss2-tcti-swtpm.so.0:libtss2-tcti-swtpm0 \
	/usr/lib/ipxe/ipxe.efi:ipxe
# openvpn and wireguard-go are the real clients of verify's session check
# (provider.session_records_observed), run in a namespace of the check's own (OpenVPN with
# --dev null); Debian's openvpn.service starts nothing without a configuration in /etc/openvpn.
# swtpm (+ swtpm-tools to manufacture one) is the harness's TPM; tpm2-tools, with its TCTI for swtpm,
# derives attestation keys and checks quotes (attest.py); sbsign signs the harness's UKI for Secure
# Boot (image/secure_boot.py; virt-firmware, from PyPI, enrols the key in OVMF's variables).
# ipxe's ipxe.efi, signed with a test key like a provider signs its own, is what a UEFI server
# netboots the published UKI with (tests/boot/test_flash_e2e.py).
# diffoscope (its minimal package: no optional comparators) says where two builds that should be
# equal differ (tests/image/test_image.py, the cold rebuild).
# openssh-server is only for the ssh:// flash tests, which start their own sshd on 127.0.0.1. When
# we install it, /etc/ssh/sshd_not_to_be_run (Debian's switch: ssh.service, ssh.socket and
# /etc/init.d/ssh all honour it; purging the package removes it) keeps the package's own sshd
# from starting, at the install or at any boot after it.

.PHONY: setup host-packages venv build test test-fast lint molecule clean

setup: host-packages venv

host-packages:
	@missing=""; \
	for pair in $(HOST_TOOLS); do command -v "$${pair%%:*}" >/dev/null || missing="$$missing $${pair##*:}"; done; \
	for pair in $(HOST_FILES); do [ -e "$${pair%%:*}" ] || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
		[ "$$(id -u)" = 0 ] || { echo "make: need root to install:$$missing" >&2; exit 1; }; \
		echo "installing Debian packages:$$missing"; \
		case " $$missing " in *" openssh-server "*) \
			[ -e /etc/ssh/sshd_not_to_be_run ] || { mkdir -p /etc/ssh && touch /etc/ssh/sshd_not_to_be_run; \
				echo "openssh-server is for the tests: /etc/ssh/sshd_not_to_be_run keeps its own sshd stopped"; } ;; \
		esac; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

build: setup
	$(BIN)/amnesiac build --policy $(POLICY) --out $(OUT)

# Every tier: fast (unit, lint; on every CPU), then in one run build (real images), boot (QEMU +
# verify), browser (the HTML report in Chromium) and molecule (every role in a container). 35 to
# 55 min on 2 cores, as fast as the machine (benchmarks/README.md has each run's tiers). The slow
# tiers run in two lanes (tests/images.py): the guest lane boots one TCG guest at a time (two
# would slow each other's boots); the build lane builds beside it, niced, each image once per
# session for both lanes, then runs the molecule scenarios one at a time, niced too: the guest
# lane's boots are the longest path, and the build lane would otherwise idle beside them.
# The slowest tests are listed at the end (--durations), then each lane's tests in order with
# the CPU time used (--timeline, tests/timeline.py): where the time goes.
test: setup
	$(BIN)/pytest -n auto -p no:cacheprovider
	$(BIN)/pytest -m 'build or boot or browser or molecule' -n 2 --dist loadgroup -p no:cacheprovider \
		--durations=40 --timeline=build/timeline-slow.jsonl

# The molecule tier alone: every role's scenario and the whole image playbook's, each a
# `molecule test` in a systemd container (podman) from the base image `amnesiac container-image`
# builds and caches (no registry), one scenario per CPU at a time (about 6 min on 2 cores).
# One scenario, for development: molecule/run test -s no_logs (molecule/README.md).
molecule: setup
	$(BIN)/pytest -m molecule -n auto -p no:cacheprovider --durations=15 tests/molecule

test-fast: venv
	$(BIN)/pytest

lint: venv
	$(BIN)/pytest tests/test_lint.py

clean:
	rm -rf build
