"""Run the exporter with names under `.fake.test` resolved from a JSON file the test rewrites at will.

`python tests/fakedns.py TABLE.json --config ...`: TABLE maps a host name to an address, or to null for "no
such name". Everything else resolves as usual. This is the only way to make DNS fail and then recover for
the same base_url without touching the machine's resolver.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SUFFIX = ".fake.test"
_TABLE = Path(sys.argv.pop(1)) if __name__ == "__main__" else None
_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if _TABLE is not None and isinstance(host, str) and host.endswith(SUFFIX):
        address = json.loads(_TABLE.read_text()).get(host)
        if address is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        host = address
    return _real_getaddrinfo(host, *args, **kwargs)


if __name__ == "__main__":
    socket.getaddrinfo = _getaddrinfo
    from exlogare_exporter.cli import main

    sys.exit(main(sys.argv[1:]))
