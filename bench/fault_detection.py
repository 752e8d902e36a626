"""How long each TrackMania fault takes to be caught (issue 24): tmrl's real interface on the fake game.

    python bench/fault_detection.py                 # every fault once, a table
    python bench/fault_detection.py --only pause_still --repeats 3

Each case runs `tests/fake_game.py` (env_tm.py with the game, its window and its controls replaced by the
fakes of tests/fake_openplanet.py; tmrl's interface and rtgym's 20 Hz are the real ones) with a small
network, the learner inline, and injects one fault at a known step. The fake game reports the wall-clock
time from the fault's start to the moment the environment raised, and the script reads the run's last
record (the error line's kind) and how many steps the saved replay holds against the fault's step. The
10 Hz plugin is not a fault that stops a run: its row is the time to the first `stale_observations` flag
and to `stale_observations_sustained` under `--on-red-flag stop`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path[:0] = [str(ROOT), str(TESTS)]

from fake_game import run_on_fake_game  # noqa: E402
from fake_openplanet import write_tmrl_data  # noqa: E402

from run_log import read_jsonl  # noqa: E402

# name: (fake game options, steps, extra arguments)
CASES: dict[str, tuple[dict, int, list[str]]] = {
    "nan (garbage)": ({"drive": 20, "fault": "nan", "fault_at": 40}, 400, []),
    "finish_stuck (mid-lap)": ({"drive": 20, "fault": "finish_stuck", "fault_at": 10}, 400, []),
    "finish_now (too fast)": ({"drive": 1, "fault": "finish_now", "fault_at": 3}, 200, []),
    "telemetry_frozen": ({"drive": 20, "fault": "telemetry_frozen", "fault_at": 40}, 400, []),
    "teleport 95 m": ({"drive": 20, "fault": "teleport", "fault_at": 40}, 400, []),
    "pause_moving": ({"drive": 20, "fault": "pause", "fault_at": 40}, 400, []),
    "pause_still": ({"drive": 0, "fault": "pause", "fault_at": 3}, 600, []),
    "resize 1280x720": ({"drive": 20, "fault": "resize", "fault_at": 40}, 400, []),
    "plugin 10 Hz": ({"drive": 20, "frame_interval": 0.1}, 600, ["--on-red-flag", "stop"]),
}


def run_case(options: dict, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_tmrl_data(root / "home")
        started = time.monotonic()
        child = run_on_fake_game(root, options, steps, *extra, timeout=600)
        wall = time.monotonic() - started
        fake = next(
            (
                json.loads(line[len("FAKE_GAME ") :])
                for line in child.stdout.splitlines()
                if line.startswith("FAKE_GAME ")
            ),
            {},
        )
        records = read_jsonl(root / "runs" / "tm" / "metrics.jsonl")
        flags = [r for r in records if r["kind"] == "event" and r.get("level") == "red_flag"]
        start = records[0]["time"]
        first_flag = {}
        for flag in flags:
            first_flag.setdefault(flag["name"], round(flag["time"] - start, 1))
        last = records[-1]
        return {
            "exit": child.returncode,
            "error": last.get("error") if last.get("event") == "error" else None,
            "detected_after_s": fake.get("detected_after_s"),
            "episodes_later": fake.get("detected_after_episodes"),
            "saved_step": last["step"],
            "flags_s_after_start": first_flag,
            "wall_s": round(wall, 1),
            "stderr": child.stderr.strip()[:160],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=list(CASES), help="run this case (repeatable)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    header = f"{'fault':<24} {'exit':>4}  {'error':<24} {'detected after':>15}  {'saved step':>10}"
    print(header + "  flags (s after start)")
    for name in args.only or list(CASES):
        options, steps, extra = CASES[name]
        results = [run_case(options, steps, extra) for _ in range(args.repeats)]
        seconds = [r["detected_after_s"] for r in results if r["detected_after_s"] is not None]
        detected = f"{statistics.median(seconds):.2f} s" if seconds else "-"
        if seconds and results[0]["episodes_later"]:
            detected += f" (+{results[0]['episodes_later']} ep)"
        first = results[0]
        print(
            f"{name:<24} {first['exit']:>4}  {str(first['error']):<24} {detected:>15}  "
            f"{first['saved_step']:>10}  {json.dumps(first['flags_s_after_start'])}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
