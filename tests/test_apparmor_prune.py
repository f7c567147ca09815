"""image/apparmor.py: a profile goes only when nothing in the image can attach to it; in doubt,
it stays. The headers are Debian's own (apparmor 4.1 in trixie)."""

from __future__ import annotations

from pathlib import Path

from amnesiac.image import apparmor

PROFILES = {
    # The image's programs: kept.
    "usr.sbin.openvpn": "abi <abi/4.0>,\nprofile openvpn /usr/sbin/openvpn {\n  /etc/openvpn/** r,\n}\n",
    "unix-chkpwd": "profile unix-chkpwd /{,usr/}{,s}bin/unix_chkpwd flags=(complain) {\n}\n",
    "bare": "/usr/sbin/unbound flags=(attach_disconnected) {\n}\n",
    # Programs it lacks: removed (a variable from tunables/, one of the file's own, a quoted path).
    "Xorg": "profile Xorg /usr/lib/xorg/Xorg flags=(complain,attach_disconnected) {\n}\n",
    "transmission": "profile transmission-daemon /usr/bin/transmission-daemon {\n}\n"
    "profile transmission-gtk /usr/bin/transmission-gtk {\n}\n",
    "opera": "profile opera /usr/lib/@{multiarch}/opera/opera flags=(unconfined) {\n}\n",
    "chromium": "@{chromium} = {,ungoogled-}chromium{,-browser}\n"
    "profile chromium /usr/lib/@{chromium}/@{chromium} flags=(unconfined) {\n}\n",
    "MongoDB_Compass": 'profile "MongoDB Compass" "/usr/lib/mongodb-compass/MongoDB Compass" {\n}\n',
    # In doubt: kept (reached by name only; a variable defined nowhere; no header at all).
    "lsb_release": "profile lsb_release {\n  /usr/bin/lsb_release r,\n}\n",
    "mystery": "profile mystery /usr/lib/@{nowhere}/mystery {\n}\n",
    "notes": "# nothing but a comment\n",
    # One profile of the file attaches to a program the image has: the file stays.
    "mixed": "profile gone /usr/bin/gone {\n}\nprofile here /usr/lib/x86_64-linux-gnu/helper {\n}\n",
}


def test_only_profiles_that_can_attach_to_nothing_go(tmp_path: Path) -> None:
    profiles = tmp_path / "etc/apparmor.d"
    (profiles / "tunables").mkdir(parents=True)
    (profiles / "tunables/multiarch").write_text("@{multiarch}=*-linux-gnu*\n")
    (profiles / "abstractions").mkdir()
    for name, text in PROFILES.items():
        (profiles / name).write_text(text)
    for program in (
        "usr/sbin/openvpn",
        "usr/sbin/unix_chkpwd",
        "usr/sbin/unbound",
        "usr/lib/x86_64-linux-gnu/helper",
    ):
        (tmp_path / program).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / program).write_text("")

    removed = apparmor.prune(tmp_path)

    assert removed == ["MongoDB_Compass", "Xorg", "chromium", "opera", "transmission"]
    left = sorted(p.name for p in profiles.iterdir())
    assert left == sorted({*PROFILES, "tunables", "abstractions"} - set(removed))


def test_a_dangling_symlink_in_the_image_is_a_program_there(tmp_path: Path) -> None:
    profiles = tmp_path / "etc/apparmor.d"
    profiles.mkdir(parents=True)
    (profiles / "vi").write_text("profile vi /usr/bin/vi {\n}\n")
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/vi").symlink_to("/etc/alternatives/vi-that-the-build-host-lacks")
    assert apparmor.prune(tmp_path) == []


def test_braces_nest_and_expand_in_order() -> None:
    assert apparmor._alternatives("/{,usr/}{,s}bin/x") == ["/bin/x", "/sbin/x", "/usr/bin/x", "/usr/sbin/x"]
    assert apparmor._alternatives("/a/{b{,c},d}/e") == ["/a/b/e", "/a/bc/e", "/a/d/e"]
    assert apparmor._alternatives("/a/{b") == ["/a/{b"]
