"""The netns helpers every other real-network test stands on."""
from __future__ import annotations

import subprocess

import pytest

from testing.netns import pair, wait_port


def test_pair_carries_tcp_and_user_switch(root_required: None) -> None:
    with pair("mbs") as (a, b):
        srv = b.popen(["python3", "-c", "import socket;s=socket.socket();s.setsockopt(1,2,1);"
                                        "s.bind(('10.99.0.2',7000));s.listen();c,_=s.accept();c.sendall(b'ok');c.close()"])
        wait_port(a, "10.99.0.2", 7000)
        out = a.python("import os,socket;print(os.getuid())", uid=1337).stdout.strip()
        assert out == "1337"
        srv.kill()
    with pytest.raises(subprocess.CalledProcessError):
        a.ip("link")  # namespace is gone
