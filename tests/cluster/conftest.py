"""The multi-node cluster fixture (tests/cluster/multinode.py)."""

from __future__ import annotations

import signal

import pytest


@pytest.fixture(scope="module")
def multinode_cluster(tmp_path_factory):
    """A head and two workers, each in a network namespace of its own, and an S3 server on the bridge
    (``s3://samtone``; every node has its AWS_* variables); removed completely after
    the module, whether its tests passed or not (skips without root or `ip netns`)."""
    from cluster.multinode import start, stop

    from samtone_ray.cluster.local import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"a multi-node Ray cluster on this machine needs root and `ip netns`: {reason}")
    state_dir = tmp_path_factory.mktemp("local-cluster")
    state = None

    def interrupted(signum, frame):  # a CI timeout's SIGTERM: tear the cluster down on the way out
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        # Ray Train's controller polls its workers every 2 s by default; the tests' runs are seconds long.
        state = start(state_dir, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1", options=("--s3",))
        yield state
    finally:
        try:
            stop(state_dir, state)
        finally:
            signal.signal(signal.SIGTERM, previous)
