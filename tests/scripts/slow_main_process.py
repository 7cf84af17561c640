"""One of 2 processes (RANK/WORLD_SIZE/MASTER_* from the environment, as torchrun sets them) on a CPU machine: the
main process works alone for SECONDS while the other waits for it, in a process group made with
``process_state(TIMEOUT)`` (what ``--ddp_timeout`` sets). Writes RECORD_DIR/rank{RANK}.json: ``{"phase": "join"
or "wait", "ended": the value computed, or the exception the process ended that phase with}``.

Usage: python tests/scripts/slow_main_process.py RECORD_DIR TIMEOUT SECONDS
"""

import json
import os
import pathlib
import sys
import time

from smpo_diffusers.distributed import computed_on_main, leave_process_group, process_state

record_dir, timeout, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
# both processes have started (imports take seconds on a busy machine) before either joins the group, whose
# timeout also bounds the joining
(record_dir / f"started{os.environ['RANK']}").touch()
while not all((record_dir / f"started{rank}").exists() for rank in (0, 1)):
    time.sleep(0.05)
phase, failed = "join", True
try:
    state = process_state(timeout)
    phase = "wait"
    ended = computed_on_main(lambda: time.sleep(seconds) or "computed", state, "work alone")
    failed = False
except Exception as error:  # noqa: BLE001 - recorded for the test to read
    ended = f"{type(error).__name__}: {error}"
(record_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"phase": phase, "ended": ended}))
leave_process_group(wait=not failed)
