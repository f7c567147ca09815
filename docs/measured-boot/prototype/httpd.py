#!/usr/bin/env python3
"""Loopback HTTP server for the netboot: files from DIR; /boot is snponly.efi for the firmware's
HTTP boot (User-Agent UefiHttpBoot) and boot.ipxe for iPXE (User-Agent iPXE/...).
usage: httpd.py DIR PORT"""
import http.server, sys, functools
class H(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path):
        if path.split("?")[0] == "/boot":
            path = "/boot.ipxe" if "iPXE" in self.headers.get("User-Agent", "") else "/snponly.efi"
        return super().translate_path(path)
    def log_message(self, fmt, *args):
        sys.stderr.write("%s UA=%s %s\n" % (self.log_date_time_string(), self.headers.get("User-Agent"), fmt % args))
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])),
    functools.partial(H, directory=sys.argv[1])).serve_forever()
