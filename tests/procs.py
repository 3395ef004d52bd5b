"""What /proc says about the processes a test started: their descendants, command lines (Ray
titles an actor's process after its class), and who listens on a port."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def listeners(port: int) -> dict[str, str]:
    """``{local address: command line of the listening process}`` of the TCP sockets listening on
    ``port`` (IPv4 and IPv6; addresses in /proc's hex form, e.g. ``0100007F`` = 127.0.0.1)."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():  # a kernel without IPv6
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, local_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(local_port, 16) == port:  # 0A = LISTEN
                inodes[f"socket:[{fields[9]}]"] = address
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [fd.readlink() for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if str(link) in inodes:
                found[inodes[str(link)]] = cmdline(int(entry.name))
    return found
