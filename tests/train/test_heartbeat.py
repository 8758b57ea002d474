"""The heartbeat on two real gloo ranks (separate processes): a frozen rank (SIGSTOP, a node lost without a TCP
reset) or a frozen store host is named by the survivor, which exits with code 7 long before the collective
timeout; a rank that stops on its own error takes the other with it; a rank that finishes is not mourned."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_utils import free_port
from tests.helpers import ROOT

# every test starts two ranks as subprocesses: the slow lane
pytestmark = pytest.mark.slow

HEARTBEAT_S = 3.0
COLLECTIVE_S = 120.0  # what would end the hang without the heartbeat


def start_ranks(mode, *args):
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    ranks = [subprocess.Popen([sys.executable, __file__, str(rank), port, mode, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for rank in range(2)]
    for rank in ranks:
        assert rank.stdout.readline().strip() == "ready", rank.stderr.read()[-3000:] if rank.poll() else ""
    return ranks


def end(process, timeout):
    """(exit code, stderr) of `process`, or None when it is still running after `timeout` seconds."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return process.returncode, process.stderr.read()


def kill_all(ranks):
    for rank in ranks:
        if rank.poll() is None:
            rank.kill()
            rank.wait()


@pytest.mark.parametrize("frozen", [1, 0])
def test_a_frozen_rank_is_named_and_the_survivor_exits(frozen):
    ranks = start_ranks("freeze", str(frozen))
    try:
        survivor = ranks[1 - frozen]
        outcome = end(survivor, timeout=COLLECTIVE_S / 2)  # well before the collective timeout would end it
        assert outcome is not None, "the survivor waited in its collective: the heartbeat did not end it"
        code, stderr = outcome
        assert code == 7, stderr[-3000:]
        if frozen == 1:  # rank 0 watches rank 1 through the store
            assert "error: rank 1 (host " in stderr and "last at step 7) has sent no heartbeat for" in stderr
        else:  # rank 0 hosts the store: the store itself falls silent
            assert "error: the rendezvous store at 127.0.0.1:" in stderr and "rank 0 or its node" in stderr
        assert f"train.heartbeat_timeout_s={HEARTBEAT_S:g}" in stderr
        assert ranks[frozen].poll() is None  # still frozen: nobody could have told the survivor by exiting
    finally:
        kill_all(ranks)


def test_a_rank_that_stops_on_its_own_error_stops_the_other():
    ranks = start_ranks("fail")
    try:
        outcome = end(ranks[0], timeout=COLLECTIVE_S / 2)
        assert outcome is not None, "rank 0 waited in its collective for the failed rank"
        code, stderr = outcome
        assert code == 7 and "rank 1 (" in stderr and "stopped: ShardPatternError: data.train_shards" in stderr
    finally:
        kill_all(ranks)


def test_a_rank_that_finished_is_not_reported_lost():
    ranks = start_ranks("finish")
    try:
        assert end(ranks[1], timeout=60)[0] == 0
        code, stderr = end(ranks[0], timeout=60)  # it outlived rank 1 by 4 heartbeat timeouts
        assert code == 0, stderr[-3000:]
    finally:
        kill_all(ranks)


def child(rank: int, port: str, mode: str, *args: str) -> None:
    """One rank: join the group, start the heartbeat, then act out `mode`."""
    import datetime

    import torch
    import torch.distributed as dist

    from simvq_scale.train.heartbeat import Heartbeat

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_S))
    heartbeat = Heartbeat.start(HEARTBEAT_S, COLLECTIVE_S)
    heartbeat.step_source = lambda: 7
    tensor = torch.zeros(1)
    dist.all_reduce(tensor)
    time.sleep(2 * heartbeat.interval_s)  # beats that carry the step
    print("ready", flush=True)
    if mode == "freeze" and rank == int(args[0]):
        os.kill(os.getpid(), signal.SIGSTOP)
    if mode == "fail" and rank == 1:
        heartbeat.fail("ShardPatternError: data.train_shards: shard pattern 'x' matches no file")
        # stay alive: an exiting process would also end rank 0's collective with a connection error, and
        # the stop key is what reaches ranks that share no connection with this one
        time.sleep(COLLECTIVE_S / 4)
        sys.exit(3)
    if mode == "finish":
        time.sleep(0 if rank == 1 else 4 * HEARTBEAT_S)
        heartbeat.finish()
        sys.exit(0)
    dist.all_reduce(tensor)  # the other rank never joins: only the heartbeat can end this wait


if __name__ == "__main__":
    child(int(sys.argv[1]), *sys.argv[2:])
