#!/usr/bin/env python3
"""Prints benches/policy-realistic.hujson grown to the size of a large enterprise policy
(about 166 KiB): 100 more groups of 20 addresses, 1,000 hosts and 1,000 rules over them.
The new rules name nobody in `benches/load`'s tailnet, so they cost what a large policy's
text costs (storing, parsing, comparing) more than what its rules cost.

    benches/policy-large.py > /tmp/policy-large.hujson
    benches/load --clients 1000 --policy /tmp/policy-large.hujson --probes 1 --no-failover
"""
from pathlib import Path

base = (Path(__file__).parent / "policy-realistic.hujson").read_text()
groups = ",\n".join(
    f'    "group:team{g}": [' + ", ".join(f'"user{g}-{u}@example.com"' for u in range(20)) + "]"
    for g in range(100)
)
hosts = ", ".join(f'"host{h}": "10.{100 + h // 250}.{h % 250}.0/24"' for h in range(1000))
acls = ",\n".join(
    f'    {{"action": "accept", "src": ["group:team{r // 10}"], "dst": ["host{r}:22,443,8000-8100"]}}'
    for r in range(1000)
)


def grow(text: str, anchor: str, extra: str) -> str:
    assert anchor in text, f"policy-realistic.hujson no longer has {anchor!r}"
    return text.replace(anchor, extra, 1)


data = '"group:data": ["user21@", "user22@", "user23@", "user24@", "user25@"],'
base = grow(base, data, data + "\n" + groups + ",")
hosts_line = '"hosts": {"dns": "10.20.0.53", "office": "192.168.10.0/24"},'
base = grow(base, hosts_line, hosts_line[:-2] + ", " + hosts + "},")
office = '{"action": "accept", "src": ["group:eng"], "dst": ["office:*"]},'
base = grow(base, office, office + "\n" + acls + ",")
print(base, end="")
