"""`python -m flows.demo.reaper PARENT_PID CHILD_PID`: stop CHILD when PARENT is gone.

For children we do not start ourselves (Prefect's temporary API server): a parent
killed with SIGKILL runs no cleanup, so a separate tiny process watches it.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(parent: int, child: int, every_s: float = 1.0) -> None:
    while alive(child):
        if not alive(parent) or os.getppid() != parent:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                return
            for _ in range(50):
                if not alive(child):
                    return
                time.sleep(0.1)
            os.kill(child, signal.SIGKILL)
            return
        time.sleep(every_s)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
