"""Blocks the network for a process started with this folder on PYTHONPATH (tests only).

Python imports ``sitecustomize`` at start-up. This one makes every connection to an address
that is not loopback, every datagram sent to one and every name lookup of a host that is not
local fail, and appends a line for each to the file ``$D3PO_NETWORK_LOG``: a test then reads
that the studio asked nothing of the network.
"""

import ipaddress
import os
import socket

_LOG = os.environ.get("D3PO_NETWORK_LOG", os.devnull)
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "", None}


def _local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse(what: str):
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(what + "\n")
    raise OSError(f"network blocked in this test: {what}")


def _inet(sock) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
_sendto, _getaddrinfo = socket.socket.sendto, socket.getaddrinfo


def _guarded_connect(self, address):
    if _inet(self) and not _local(address[0]):
        _refuse(f"connect {address}")
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if _inet(self) and not _local(address[0]):
        _refuse(f"connect {address}")
    return _connect_ex(self, address)


def _guarded_sendto(self, data, *args):
    address = args[-1]
    if _inet(self) and not _local(address[0]):
        _refuse(f"sendto {address}")
    return _sendto(self, data, *args)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        _refuse(f"lookup {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.socket.sendto = _guarded_sendto
socket.getaddrinfo = _guarded_getaddrinfo
