#!/usr/bin/env python3
"""Where a process's resident memory is: /proc/PID/smaps summed per mapped file and per kind of
anonymous mapping. Prints "name<TAB>rss_kib<TAB>anon_kib" lines, largest first, then "total".

Anonymous mappings are told apart by their neighbours: a thread stack is a read-write mapping right
above a guard page (an inaccessible mapping of one page or a few); a glibc malloc arena is a
read-write mapping followed by an inaccessible one that together make 64 MiB (HEAP_MAX_SIZE);
[heap] is the main arena (brk). "anon: other" is the rest (large mallocs, which glibc mmaps one by
one, and what libraries map themselves). anon_kib is the part that is private memory (RssAnon: this
includes the copied-on-write pages of a file mapping, such as relocated data of the binary)."""
import os
import sys

pid = sys.argv[1]
DELETED = " (deleted)"
exe = os.readlink(f"/proc/{pid}/exe").removesuffix(DELETED)
maps = []
with open(f"/proc/{pid}/smaps") as f:
    cur = None
    for line in f:
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            cur = {"lo": lo, "hi": hi, "perms": parts[1], "path": " ".join(parts[5:]), "rss": 0, "anon": 0}
            maps.append(cur)
        elif parts[0] == "Rss:":
            cur["rss"] = int(parts[1])
        elif parts[0] == "Anonymous:":
            cur["anon"] = int(parts[1])

ARENA = 64 << 20
groups = {}
for i, m in enumerate(maps):
    path = m["path"].removesuffix(DELETED)
    if path == exe:
        name = "binary " + os.path.basename(exe)
    elif path.startswith("/"):
        name = os.path.basename(path)
    elif path:
        name = path
    else:
        prev = maps[i - 1] if i else None
        nxt = maps[i + 1] if i + 1 < len(maps) else None
        if m["perms"].startswith("---"):
            name = "anon: guard pages and arena reserve"
        elif prev and not prev["path"] and prev["perms"].startswith("---") and prev["hi"] == m["lo"] \
                and prev["hi"] - prev["lo"] <= 64 << 10:
            name = "anon: thread stacks"
        elif nxt and not nxt["path"] and nxt["perms"].startswith("---") and nxt["lo"] == m["hi"] \
                and nxt["hi"] - m["lo"] == ARENA:
            name = "anon: malloc arenas (threads')"
        else:
            name = "anon: other"
    g = groups.setdefault(name, [0, 0, 0])
    g[0] += m["rss"]
    g[1] += m["anon"]
    g[2] += 1
for name, (rss, anon, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
    if rss or anon:
        print(f"{name}\t{rss}\t{anon}\t{n}")
print(f"total\t{sum(g[0] for g in groups.values())}\t{sum(g[1] for g in groups.values())}\t{len(maps)}")
