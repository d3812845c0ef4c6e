"""The nginx peer both benchmarks run: sendfile, open_file_cache, one worker per core, no log."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

NGINX_CONF = textwrap.dedent("""
    worker_processes {workers};
    daemon off;
    pid {tmp}/nginx.pid;
    error_log {tmp}/error.log warn;
    events {{ worker_connections 4096; }}
    http {{
        include /etc/nginx/mime.types;
        default_type application/octet-stream;
        access_log off;
        sendfile on;
        tcp_nopush on;
        open_file_cache max=1000 inactive=60s;
        open_file_cache_valid 60s;
        keepalive_requests 1000000;
        client_body_temp_path {tmp}/body;
        proxy_temp_path {tmp}/proxy;
        fastcgi_temp_path {tmp}/fastcgi;
        uwsgi_temp_path {tmp}/uwsgi;
        scgi_temp_path {tmp}/scgi;
        server {{
            listen {host}:{port};
            root {docroot};
        }}
    }}
""")


def start_nginx(docroot: Path, host: str, port: int, tmp: Path) -> subprocess.Popen:
    """nginx serving docroot on host:port, its pid and temp files in tmp."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=os.cpu_count() or 1, tmp=tmp, host=host, port=port,
                                      docroot=docroot))
    return subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
