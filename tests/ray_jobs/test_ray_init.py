"""A local instance started by the pipelines names itself to every process of the job, so Ray's
own state-API lookups (Ray Train's placement-group cleaner) never find another cluster."""

import subprocess
import sys
from pathlib import Path

from .ray_helpers import env_without_ray_address

SCRIPT = """
import ray
from pipelines._ray import init_ray
from ray.dashboard.utils import get_address_for_submission_client
from ray.util.state import get_actor

init_ray(dashboard=True)

@ray.remote
class Probe:
    def lookup(self, actor_id):
        # What the cleaner does: no address given.
        return get_address_for_submission_client(None), get_actor(actor_id).state

probe = Probe.remote()
url, state = ray.get(probe.lookup.remote(probe._actor_id.hex()))
print("URL", url, "STATE", state)
ray.shutdown()
"""


def test_local_instance_is_what_workers_state_api_finds():
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env_without_ray_address(), cwd=Path(__file__).parents[2],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("URL"))
    url, state = line.split()[1], line.split()[3]
    assert url.startswith("http://127.0.0.1:")
    assert state == "ALIVE"
