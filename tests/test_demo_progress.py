"""`fedmed demo` shows the simulator's progress: the lines read from its log, as it grows."""

import threading
import time

from fedmed_components.flare.job import follow_log, progress_message, round_progress

# As the simulator writes them: progress bars redraw with \r and a log line can follow
# a bar on the same line.
LOG = (
    "WARNING: 'nvflare simulator' is deprecated. Use 'python job.py' with SimEnv instead.\n"
    "2026-12-03 17:49:51,354 - INFO - round 0 started\n"
    "2026-12-03 17:49:51,633 - INFO - round 0: sampled ['site-1', 'site-2'] of ['site-1', 'site-2']\n"
    "local training:   0%|          | 0/45 [00:00<?, ?it/s]\rlocal training: 100%|██████████| 45/45 [10:56<00:00, loss=0.053]"
    "                    2026-12-03 18:06:20,123 - INFO - site-1 round 0: 45 steps, 6547 supervised tokens, "
    "train loss 0.6503, val loss 0.3184, 41 tok/s, payload 19.54 MB, 645.2 s\n"
    "2026-12-03 18:06:21,000 - INFO - site-2 round 0: candidate losses {'a': 0.5}\n"
    "2026-12-03 18:06:22,000 - WARNING - round 0: no update from ['site-2'] (timed out or failed); continuing without them\n"
    "2026-12-03 18:06:22,500 - INFO - round 0 done in 891.6 s with ['site-1']\n"
    "2026-12-03 18:06:22,600 - INFO - round 1 started\n"
)
EXPECTED = [
    "round 1/2 started",
    "round 1/2 site-1: train loss 0.6503, val loss 0.3184 (45 steps, 645 s)",
    "round 1/2 warning: no update from ['site-2'] (timed out or failed); continuing without them",
    "round 1/2 done in 892 s",
    "round 2/2 started",
]


def test_progress_lines_from_the_simulator_log():
    lines = [progress_message(line, num_rounds=2) for line in LOG.split("\n")]
    assert [m for m in lines if m] == EXPECTED
    assert progress_message("2026-12-03 17:49:51,354 - INFO - round 4 started") == "round 5 started"


def test_progress_lines_from_a_poc_job_log_with_flares_context():
    context = "[identity=site-1, run=8f2c, peer=server, task_name=train, task_id=1a2b]"
    site = f"2026-12-04 05:20:01,000 - site_tasks - INFO - {context} - site-1 round 2: 45 steps, 6547 supervised tokens, "
    site += "train loss 0.2031, val loss 0.2210, 41 tok/s, payload 19.54 MB, 180.4 s"
    server = "2026-12-04 05:20:02,500 - FedMedController - INFO - [identity=server, run=8f2c, wf=controller] - round 2 done in 190.2 s"
    assert progress_message(site, num_rounds=3) == "round 3/3 site-1: train loss 0.2031, val loss 0.2210 (45 steps, 180 s)"
    assert progress_message(server, num_rounds=3) == "round 3/3 done in 190 s"


def test_follow_log_reads_a_growing_file_to_its_end(tmp_path):
    log = tmp_path / "simulator.log"
    seen = []
    with open(log, "w") as out, follow_log(log, round_progress(2, write=seen.append, indent="")):
        for chunk in (LOG[:70], LOG[70:300], LOG[300:]):  # lines arrive cut anywhere
            out.write(chunk)
            out.flush()
            time.sleep(0.3)
    assert seen == EXPECTED
    assert not [t for t in threading.enumerate() if t.name == "simulator-log"]


def test_follow_log_without_a_callback_follows_nothing(tmp_path):
    with follow_log(tmp_path / "absent.log", None):
        assert not [t for t in threading.enumerate() if t.name == "simulator-log"]
