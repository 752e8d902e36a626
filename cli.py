"""The command line of env_tm.py and the exit codes of every entry point (env_tm.py, distributed.py).

It imports only the standard library and tm_config (no torch), so `python env_tm.py --help` and the
one-line refusals of a bad command line answer at once; the training modules are imported when a run starts.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys

EXIT_OK, EXIT_ERROR, EXIT_GAME, EXIT_RED_FLAG, EXIT_NO_GO, EXIT_INTERRUPTED = 0, 1, 3, 4, 5, 130


def exit_interrupted() -> None:
    """Ctrl+C while starting, or a second one while shutting down: one line, no traceback."""
    print(
        "interrupted (Ctrl+C): stopped at once. A checkpoint is written whole or not at all: the last one "
        "reported as saved stands, and a run resumes from it",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(EXIT_INTERRUPTED)


try:  # numpy loads here: Ctrl+C in the first second of a start must not print its import stack
    from tm_config import Config, Runtime, folder_name_problem
except KeyboardInterrupt:
    exit_interrupted()

DIAGNOSE_DEFAULT_STEPS = 5_000

EXAMPLES = """\
examples:
  python env_tm.py                                   TrackMania if the game answers, else the embedded track
  python env_tm.py --env embedded --steps 200000 --run-name first-try
  python env_tm.py --run-name first-try              resumes first-try where its checkpoint stands
  python env_tm.py --set batch_size=64 --set discount_factor=0.99
                                                     a departure: its own run folder, recorded as such
  python env_tm.py --no-wandb --device cpu --seed 3 --threads 1
  python env_tm.py --diagnose                        5,000-step go/no-go check from scratch
  python env_tm.py --env embedded --eval-every 10000 --eval-episodes 5
  python env_tm.py --check-trackmania                 every step of the game's set-up, without training
  python env_tm.py --env embedded --watch checkpoints/first-try
                                                     its best.pt drives 5 held-out tracks, in a window
  python env_tm.py --env embedded --watch checkpoints/first-try/latest.pt --record-video drive.gif
  python compare_runs.py checkpoints/first-try checkpoints/other-run

A run lives in checkpoints/<run-name>/ (default <env>-seed<seed>, plus the --set departures). Started
again, it resumes from its newest good checkpoint, with its config and its --learner, --threads,
--on-red-flag, --eval-every and --eval-episodes unless given again; --resume makes a missing checkpoint an
error, --fresh moves the old folder aside and starts over. Ctrl+C stops after the current step and saves.
"""


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run folder (one plain folder name, valid on Windows too), or None."""
    return folder_name_problem(name)


# --- command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    pinned = Config()
    parser = argparse.ArgumentParser(
        description="Train the Rainbow-IQN agent on TrackMania 2020 (tmrl) or on the embedded track.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--env",
        choices=["auto", "trackmania", "embedded"],
        default="auto",
        help="auto (default): TrackMania when tmrl is installed and the game answers, else the embedded "
        "track, saying why in one line",
    )
    parser.add_argument(
        "--steps",
        type=step_count,
        default=None,
        help=f"train until this global step (default: training_steps, {pinned.training_steps:,})",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (default: CUDA when torch can use it), cpu or cuda"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seeds the agent, the replay and the tracks (default 0; a scale-out worker: one derived from "
        "its --worker-name, so that two workers never drive alike)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the learner (default: all cores but one when the game or the actor needs a "
        "core, else torch's default)",
    )
    parser.add_argument(
        "--run-name",
        default=None,
        help="the run's folder under the checkpoints folder, one plain folder name (default: "
        "<env>-seed<seed>, with the --set departures appended)",
    )
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=None,
        help="resume the run, and fail if it has no checkpoint (without it, a run resumes when it can)",
    )
    resume.add_argument(
        "--fresh",
        dest="resume",
        action="store_false",
        help="start over: an existing run folder is moved aside (<name>.replaced-<time>), never mixed in",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable); recorded as a departure from the known-good config",
    )
    unpin = parser.add_argument_group(
        "unpinning (the three sacred invariants of the known-good run; README: The known-good config)"
    )
    unpin.add_argument(
        "--unpin-target-update",
        action="store_true",
        help="allow --set target_network_update_frequency=...; the run is marked unpinned",
    )
    unpin.add_argument(
        "--unpin-learning-rate", action="store_true", help="allow --set learning_rate=...; marked unpinned"
    )
    unpin.add_argument(
        "--unpin-epsilon",
        action="store_true",
        help="allow --set of epsilon_start, epsilon_end, epsilon_decay_to, epsilon_cutoff; marked unpinned",
    )
    parser.add_argument("--no-wandb", action="store_true", help="log to the run's metrics.jsonl only")
    parser.add_argument(
        "--on-red-flag",
        choices=["warn", "stop", "rollback"],
        default=None,
        help="on a fatal red flag (diverging Q, NaN, dead gradients, frozen game): report it (default), "
        "stop the run, or restore the last checkpoint taken before it and continue",
    )
    parser.add_argument(
        "--diagnose",
        type=step_count,
        nargs="?",
        const=DIAGNOSE_DEFAULT_STEPS,
        default=None,
        metavar="N",
        help=f"go/no-go: train N steps from scratch (default {DIAGNOSE_DEFAULT_STEPS:,}; a few minutes on a "
        "2-core CPU, the time left is shown once the pace is measured), print a table of health criteria "
        "and exit 5 on a no-go",
    )
    parser.add_argument(
        "--eval-every",
        type=step_count,
        default=None,
        metavar="STEPS",
        help="evaluate at step 0, at the first episode end past every multiple of STEPS, and at the end "
        "of the run: --eval-episodes episodes driven greedily (no epsilon, no noise, nothing stored or "
        "learned) on held-out tracks (default 0: never)",
    )
    parser.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation (default 5)")
    parser.add_argument(
        "--learner",
        choices=["beside", "inline"],
        default=None,
        help="beside (default): learn in a process beside the actor, so the game never waits for a learn "
        "step; inline: act and learn in turn in one process (exact reproduction of a recorded run)",
    )
    parser.add_argument("--wandb-project", default=None, help="W&B project (default: rainbow-tm)")
    parser.add_argument(
        "--wandb-entity", default=None, help="W&B entity: your user or team (default: your W&B default)"
    )
    parser.add_argument(
        "--show-config",
        action="store_true",
        help="print every config key with the value this command would train with (the pin plus --set), "
        "marking departures and the sacred keys, and exit",
    )
    parser.add_argument(
        "--check-trackmania",
        action="store_true",
        help="check every step of the TrackMania set-up (tmrl, TmrlData, config.json, the reward trajectory, "
        "the gamepad driver, the plugin, its telemetry, the map), one line each, and exit without training",
    )
    look = parser.add_argument_group("watching a checkpoint drive (no learning)")
    look.add_argument(
        "--watch",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="drive --eval-episodes held-out tracks greedily with a checkpoint (a file, or a run folder: its "
        "best.pt; default: this command's run folder), printing each return; the embedded track in a window",
    )
    look.add_argument(
        "--record-video",
        metavar="PATH",
        default=None,
        help="with --watch on the embedded track: write the drive to PATH (.gif or .mp4) instead of a window",
    )
    demo = parser.add_argument_group("demonstrations (your own laps; README: Learn from your own laps)")
    demo.add_argument(
        "--record-demos",
        metavar="NAME",
        default=None,
        help="record demonstrations into <demo-root>/NAME instead of training: on TrackMania you drive, on "
        "the embedded track you drive (--driver human) or a scripted driver does",
    )
    demo.add_argument(
        "--driver",
        choices=["human", "scripted"],
        default="human",
        help="who drives the embedded track when recording (default human: the arrow keys, in a window)",
    )
    demo.add_argument(
        "--demo-episodes",
        type=int,
        default=None,
        metavar="N",
        help="record N episodes (default: until Ctrl+C)",
    )
    demo.add_argument(
        "--demos",
        metavar="NAME[,NAME...]",
        default=None,
        help="train with these demonstration sets beside the agent's own data (a recorded departure: the "
        "same as --set demos=...)",
    )
    demo.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        metavar="N",
        help="with --demos: N learn steps on the demonstrations alone before the first environment step",
    )
    demo.add_argument(
        "--demo-root", default="demos", help="the folder of demonstration sets (default: demos)"
    )
    scale = parser.add_argument_group(
        "scale out (several game PCs, one learner; see README: Running across machines)"
    )
    scale.add_argument(
        "--role",
        choices=["single", "server", "trainer", "worker"],
        default="single",
        help="single (default): this PC; server: tmrl's relay; trainer: learns from the workers' "
        "episodes; worker: drives one game (--env) and sends its episodes",
    )
    scale.add_argument(
        "--server-ip",
        default="127.0.0.1",
        help="address of the machine running --role server (default 127.0.0.1)",
    )
    scale.add_argument(
        "--port",
        type=int,
        default=55555,
        help="the relay's TCP port, to open in the firewall (default 55555)",
    )
    scale.add_argument(
        "--password-file",
        default=None,
        help="the relay password (default ~/.rainbow-tm/relay-password.txt; the server creates it on its "
        "first run, copy it to the other machines)",
    )
    scale.add_argument("--tls", action="store_true", help="encrypt the relay's traffic with TLS")
    scale.add_argument(
        "--tls-dir",
        default=None,
        help="folder with certificate.pem (and key.pem on the server); default: tlspyo's credentials folder",
    )
    scale.add_argument(
        "--tls-hostname", default="default", help="the name in the TLS certificate (default: default)"
    )
    scale.add_argument(
        "--make-tls-credentials",
        action="store_true",
        help="write key.pem and a self-signed certificate.pem for --tls-hostname into --tls-dir, then exit",
    )
    scale.add_argument("--max-workers", type=int, default=None, help="server: refuse workers beyond this")
    scale.add_argument("--worker-name", default=None, help="worker: its name in logs (default host-pid)")
    parser.add_argument(
        "--checkpoint-root", default=None, help="the folder of run folders (default: checkpoints)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seed_given = args.seed is not None
    args.seed = 0 if args.seed is None else args.seed
    # The runtime knobs (tm_config.Runtime): a resumed run keeps its own unless they are given again.
    args.runtime_given = {key for key in Runtime.GIVEN_BY if getattr(args, key) is not None}
    for key in Runtime.GIVEN_BY:
        if getattr(args, key) is None:
            setattr(args, key, getattr(Runtime(), key))
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be a TCP port (1-65535), got {args.port}")
    if args.role != "single" and args.diagnose is not None:
        parser.error("--diagnose runs on a single PC (--role single)")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0 (0: no evaluation), got {args.eval_every}")
    if args.eval_episodes < 1:
        parser.error(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    if args.run_name is not None:
        problem = run_name_problem(args.run_name)
        if problem is not None:
            parser.error(f"--run-name {args.run_name!r} {problem}")
    if args.record_demos is not None:
        problem = folder_name_problem(args.record_demos)
        if problem is not None:
            parser.error(f"--record-demos {args.record_demos!r} {problem}")
        if args.role != "single" or args.diagnose is not None or args.demos:
            parser.error("--record-demos records on this PC only, without --role, --diagnose or --demos")
    if args.record_video is not None and args.watch is None:
        parser.error("--record-video records a checkpoint driving: give --watch too")
    if args.watch is not None and (args.role != "single" or args.diagnose is not None or args.record_demos):
        parser.error("--watch drives on this PC only, without --role, --diagnose or --record-demos")
    if args.demo_episodes is not None and args.demo_episodes < 1:
        parser.error(f"--demo-episodes must be >= 1, got {args.demo_episodes}")
    if args.pretrain_steps is not None and not args.demos:
        parser.error("--pretrain-steps learns from demonstrations: give them with --demos")
    # --demos and --pretrain-steps are config values: departures like any --set, recorded as such.
    if args.demos:
        args.overrides.append(f"demos={args.demos}")
    if args.pretrain_steps is not None:
        args.overrides.append(f"demo_pretrain_steps={args.pretrain_steps}")
    return args


def unpin_flags(args: argparse.Namespace) -> set[str]:
    """The --unpin-* flags given on the command line."""
    given = {
        "--unpin-target-update": args.unpin_target_update,
        "--unpin-learning-rate": args.unpin_learning_rate,
        "--unpin-epsilon": args.unpin_epsilon,
    }
    return {flag for flag, present in given.items() if present}


def step_count(text: str) -> int:
    """A count of steps as people write it: 60000, 60_000, 60,000 or 6e4 (a whole number)."""
    cleaned = text.strip().replace("_", "").replace(",", "")
    try:
        value = float(cleaned) if any(c in cleaned for c in ".eE") else int(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of steps (e.g. 60000, 60_000 or 6e4)"
        ) from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of steps")
    return int(value)


def show_config(config: Config) -> str:
    """Every config key with its value, the pinned value where it departs, and the sacred keys marked."""
    from tm_config import SACRED_FLAGS

    pinned, departures = Config(), config.departures()
    width = max(len(key) for key in config.to_dict())
    lines = ["the config this command would train with (tm_config.py; * departs from the known-good pin):"]
    for key, value in config.to_dict().items():
        mark = "*" if key in departures else " "
        note = f"   (known-good {getattr(pinned, key)!r})" if key in departures else ""
        if key in SACRED_FLAGS:
            note += f"   sacred: {SACRED_FLAGS[key]} to change"
        lines.append(f"{mark} {key.ljust(width)}  {value!r}{note}")
    return "\n".join(lines)


def default_run_name(env_name: str, seed: int, overrides: list[str], diagnosing: bool) -> str:
    """checkpoints/<this>/: `<env>-seed<seed>`, with the departures in the name when --set is given, so that
    an experiment never resumes (and changes for good) the run without them, nor one with other ones."""
    name = f"{env_name}{'-diagnose' if diagnosing else ''}-seed{seed}"
    if not overrides:
        return name
    parts = sorted(
        "".join(c if c.isalnum() or c in "._=-" else "_" for c in a.replace(" ", "")) for a in overrides
    )
    tag = "+".join(parts)
    if len(tag) > 60:
        tag = f"{tag[:40]}-{hashlib.sha1('+'.join(parts).encode()).hexdigest()[:8]}"
    return f"{name}-{tag}".rstrip(". ")  # Windows drops trailing dots and spaces from folder names
