"""rainbow-tm: train the Rainbow-IQN agent on TrackMania 2020 (through tmrl) or on the embedded track.

    python env_tm.py                          # TrackMania if the game answers, else the embedded track
    python env_tm.py --env embedded --steps 200000 --run-name try1
    python env_tm.py --set batch_size=64      # a departure from the known-good config, recorded as such
    python env_tm.py --help

The loop, as pinned by the known-good run (seed 004): one learn step per environment step once a batch
is stored; the target net is a hard copy of the online net every 1500 learn steps; epsilon is a function
of the global step, which (like the episode count) carries across resumes. By default the learner runs in
a process beside this one (beside.py), so the game never waits for a learn step; `--learner inline` acts
and learns in turn, as the reference did.

This file imports only the standard library, cli.py (the command line and the exit codes) and tm_config at
the top, so `--help` answers at once; the training modules (torch among them) are imported when a run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

# cli imports tm_config, which loads numpy: a Ctrl+C meanwhile ends in one line (cli.exit_interrupted).
from cli import (
    EXIT_ERROR,
    EXIT_GAME,
    EXIT_INTERRUPTED,
    EXIT_NO_GO,
    EXIT_OK,
    EXIT_RED_FLAG,
    exit_interrupted,
    parse_args,
    show_config,
    unpin_flags,
)
from tm_config import Config, ConfigError, check_sacred_assignments


# --- the actor loop ------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> Any:
    """Act in the environment and hand every step to the learner; returns a session.TrainResult."""
    import numpy as np

    import environment
    from beside import LearnerDiedError
    from console import StepLatency, StopRequest, duration, table
    from health import EpisodeResult
    from rainbow import ACTION_VECTORS
    from session import RedFlagStopError, Session, TrainingStoppedError, TrainResult
    from tm_game import GameNotRespondingError, TrackManiaError
    from tm_logs import route_thread_errors

    env_name = environment.choose_environment(args.env, Config().with_assignments(args.overrides))
    session = Session(args, env_name)  # beside or inline: the runtime's (--learner, or the run's own)
    config, actor, learner, progress, log = (
        session.config, session.actor, session.learner, session.progress, session.log
    )  # fmt: skip
    thread_log = getattr(environment.environment_class(env_name), "thread_log", None)
    unroute = route_thread_errors(session.run_dir / thread_log) if thread_log else None
    try:
        env = environment.build_environment(env_name, config, args.seed, session.runtime)
    except BaseException:
        if unroute is not None:
            unroute()
        session.close()
        raise
    # A real-time game cannot pause mid-episode: the actor runs up to learner_max_lag steps ahead of a
    # slower learner and lets it catch up at the episode's end, while the car respawns. The embedded track
    # can wait, so it stays within simulator_max_lag: its data then comes from a policy as fresh as inline
    # or in the game when the learner keeps up with 20 Hz (tm_config.py).
    real_time = bool(getattr(env, "real_time", False))
    max_lag = config.learner_max_lag if real_time else config.simulator_max_lag
    # The game's checks condemn a frozen stream or capture a few steps after it began: its latest steps
    # wait that long before they reach the learner, so a lie is dropped whole, never learned from.
    session.verdict_steps = int(getattr(env, "verdict_steps", 0))
    diagnosing = args.diagnose is not None

    def env_seed() -> int:
        return environment.training_seed(args.seed, session.run.episode)

    def reset() -> tuple[np.ndarray, np.ndarray]:
        obs, _ = env.reset(seed=env_seed())
        frames, car = environment.split_observation(obs, config)
        session.start_episode(frames, car)
        return frames, car

    step_latency = StepLatency(config.time_step_duration)
    stop = StopRequest()
    stop.install()
    start_step, announced = session.run.step, not diagnosing
    started = time.perf_counter()
    try:
        session.pretrain(stop)
        if not stop.requested:
            session.evaluate_if_due(env)
        progress.restart_rate(session.run.step)  # the pace of training, from its first step
        episode_reward, episode_length, episode_start = 0.0, 0, time.perf_counter()
        env_timeouts = getattr(env, "time_step_timeouts", 0)
        episode_timeouts = 0
        if not stop.requested:  # Ctrl+C during pretraining: straight to the exit save, no respawn
            frames, car = reset()
        observed = time.perf_counter()  # the game waits for us from here until the next env.step
        while session.run.step < session.total_steps and not stop.requested:
            run = session.run
            learner.check_alive()  # never drive on with a frozen policy
            session.refresh_actor()
            action = actor.act(frames, car, run.step)
            step_latency.add(time.perf_counter() - observed)
            obs, reward, terminated, truncated, info = env.step(ACTION_VECTORS[action].copy())
            observed = time.perf_counter()
            next_frames, next_car = environment.split_observation(obs, config)
            reward = environment.checked_reward(reward, run.step)
            now_timeouts = getattr(env, "time_step_timeouts", 0)  # TrackMania only: the PC missed 20 Hz
            run.time_step_timeouts += now_timeouts - env_timeouts
            episode_timeouts += now_timeouts - env_timeouts
            env_timeouts = now_timeouts
            flags = session.store_step(action, reward, terminated, truncated, next_frames, next_car)
            flags += session.learn()
            episode_reward += reward
            episode_length += 1
            frames, car = next_frames, next_car
            episode_over = terminated or truncated
            if not episode_over:
                waited = session.keep_pace(max_lag)
                if not real_time:
                    observed += waited  # a simulator's chosen wait for the learner, reported on its own
            session.status(episode_reward)
            if not announced and run.step - start_step >= 200:
                pace = (run.step - start_step) / (time.perf_counter() - started)
                progress.message(
                    f"diagnosis: {session.total_steps:,} steps at {pace:.1f} steps/s takes about "
                    f"{duration(session.total_steps / pace)} in all"
                )
                announced = True
            if episode_over:
                result = EpisodeResult(
                    episode_reward, episode_length, bool(terminated), time.perf_counter() - episode_start,
                    finished=bool(info.get("finished", False)), progress=info.get("progress"),
                    race_time=info.get("race_time"), telemetry_fps=info.get("telemetry_fps"),
                    telemetry_wait_share=info.get("telemetry_wait_share"),
                    timeouts=episode_timeouts, min_finish_seconds=getattr(env, "min_finish_seconds", None),
                )  # fmt: skip
                flags += session.end_episode(result, real_time=real_time, **step_latency.take_episode())
            rolled_back = session.handle(flags) if flags else False
            if episode_over or rolled_back:
                if stop.requested:
                    break  # Ctrl+C: the exit save follows at once (no catch-up, checkpoint or evaluation)
                # The learner catches up while the car respawns, and the red flags of the steps it caught up
                # on are handled before a checkpoint is asked for: a checkpoint written after a failure must
                # never become the one a rollback returns to.
                flags = session.absorb(learner.sync(give_up=lambda: stop.requested))
                if flags:
                    rolled_back = session.handle(flags) or rolled_back
                if stop.requested:
                    break
                if episode_over and not rolled_back and session.checkpoint_due():
                    session.save(is_periodic=True)  # written while the car respawns, not while it drives
                session.evaluate_if_due(env)
                episode_reward, episode_length, episode_start = 0.0, 0, time.perf_counter()
                episode_timeouts = 0
                frames, car = reset()
                step_latency.take_episode()  # a rolled-back episode's steps are not an episode's
                env_timeouts = getattr(env, "time_step_timeouts", 0)
                observed = time.perf_counter()
        return session.finish(env, stop.requested)
    except (
        GameNotRespondingError,
        TrackManiaError,
        environment.ObservationError,
        TrainingStoppedError,
    ) as error:
        session.report_fault(error)
        raise
    except (LearnerDiedError, RedFlagStopError) as error:
        # Nothing to save: the learner that holds the state is gone, or the state is what failed. The
        # record says why the run ended, for whoever reads metrics.jsonl (compare_runs.py, a person).
        log.write("run", session.run.step, event="error", error=type(error).__name__, message=str(error))
        raise
    except KeyboardInterrupt:  # the second Ctrl+C: no save, the state may be mid-update
        progress.message(
            f"aborted at step {session.run.step:,} without saving; the last checkpoint is "
            f"{session.store.latest_path}"
        )
        log.write("run", session.run.step, event="aborted")
        return TrainResult(EXIT_INTERRUPTED, session.run_dir, config)
    finally:  # however the run ended: what it did, and a game-side view of its health
        progress.message(table(f"summary of run {session.run_name}", session.summary_rows(step_latency)))
        stop.uninstall()
        try:
            session.close()
        finally:
            env.close()
            if unroute is not None:
                unroute()


def check_trackmania(args: argparse.Namespace, **options: Any) -> int:
    """--check-trackmania: the set-up report, one line per step; exit 0 when TrackMania can train."""
    from tm_setup import setup_report

    checks = setup_report(Config().with_assignments(args.overrides), **options)
    for check in checks:
        print(check.line(), flush=True)
    failed = [check.name for check in checks if check.passed is False]
    if failed:
        print(
            f"TrackMania is not ready: fix {', '.join(failed)} (in this order), then check again", flush=True
        )
        return EXIT_GAME
    print("TrackMania is ready: `python env_tm.py` trains on it", flush=True)
    return EXIT_OK


def watch_checkpoint(args: argparse.Namespace) -> int:
    """--watch: a checkpoint's greedy policy drives, nothing is learned (watch.py)."""
    from pathlib import Path

    import environment
    import watch
    from cli import default_run_name

    config = Config().with_assignments(args.overrides)
    env_name = environment.choose_environment(args.env, config)
    root = Path(args.checkpoint_root or config.checkpoint_dir)
    run_dir = root / (args.run_name or default_run_name(env_name, args.seed, args.overrides, False))
    return watch.watch(args, env_name, run_dir)


def report_diagnosis(result: Any) -> int:
    """The go/no-go table of a finished diagnostic run; non-zero exit on a no-go."""
    from diagnose import diagnose, format_table, verdict
    from run_log import METRICS_FILE, read_jsonl

    criteria = diagnose(read_jsonl(result.run_dir / METRICS_FILE), result.config)
    print(format_table(criteria), flush=True)
    return EXIT_OK if verdict(criteria) else EXIT_NO_GO


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.diagnose is not None:
        args.steps = args.diagnose
    try:
        check_sacred_assignments(args.overrides, unpin_flags(args))
        config = Config().with_assignments(args.overrides)  # a bad value is one line before anything starts
        if args.show_config:
            print(show_config(config))
            return EXIT_OK
        if args.diagnose is not None:  # refused now, not after the learner has started
            from diagnose import DIAG_MIN_LEARN_STEPS

            shortest = DIAG_MIN_LEARN_STEPS + config.batch_size
            if args.diagnose < shortest:
                raise ConfigError(
                    f"--diagnose {args.diagnose:,} is too short: the go/no-go criteria need at least "
                    f"{shortest:,} steps ({DIAG_MIN_LEARN_STEPS:,} learn steps)"
                )
        from rainbow import resolve_device

        resolve_device(args.device)
        if args.record_demos is not None:
            from record_demos import record_demos

            return record_demos(args)
        if args.watch is not None:
            return watch_checkpoint(args)
        if args.check_trackmania:
            return check_trackmania(args)
        if args.role != "single" or args.make_tls_credentials:
            import distributed  # imports tmrl's networking only when a role needs it

            try:
                return distributed.run_role(args)
            except distributed.NetworkSetupError as error:
                print(f"error: {error}", file=sys.stderr)
                return EXIT_ERROR
        result = train(args)
        if args.diagnose is not None and result.exit_code == EXIT_OK:
            return report_diagnosis(result)
        return result.exit_code
    except BrokenPipeError:  # the output was closed (`--show-config | head`): nothing more to tell it
        import os

        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ConfigError as error:  # classified without importing torch: a bad --set is refused at once
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:
        code = exit_code_for(error)
        if code is None:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return code


def one_line(error: Exception) -> str:
    """The error's message on one line; a file-system error names its cause and what to do."""
    if isinstance(error, OSError) and error.errno is not None:
        from pathlib import Path

        from checkpoints import describe_write_error

        where = Path(error.filename) if error.filename else Path.cwd()
        return describe_write_error(error, where)
    return " ".join(str(error).split())


def exit_code_for(error: Exception) -> int | None:
    """The exit code of an error that ends a run in one line (None: a bug, let it show its traceback)."""
    from beside import LearnerDiedError
    from checkpoints import CheckpointError
    from demos import DemoError
    from environment import ObservationError
    from rainbow import DeviceError
    from session import RedFlagStopError, TrainingStoppedError
    from tm_game import TrackManiaError
    from watch import WatchError

    if isinstance(error, RedFlagStopError):
        return EXIT_RED_FLAG
    if isinstance(error, TrackManiaError):  # a missing game, plugin or TmrlData; bad telemetry; a dead game
        return EXIT_GAME
    one_line = (
        ConfigError,
        CheckpointError,
        ObservationError,
        TrainingStoppedError,
        LearnerDiedError,
        DeviceError,
        DemoError,
        WatchError,
    )
    if isinstance(error, (*one_line, OSError)):
        return EXIT_ERROR
    return None


if __name__ == "__main__":
    # Run as the module `env_tm`, not `__main__`: the learner process and distributed.py import modules
    # that must be the same objects as ours (an error raised by one copy would not be caught by another).
    try:
        import env_tm
    except KeyboardInterrupt:
        exit_interrupted()
    try:
        code = env_tm.main()
    except KeyboardInterrupt:  # Ctrl+C while starting, or a second one while shutting down
        exit_interrupted()
    sys.exit(code)
