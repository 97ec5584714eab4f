"""A small program for tests/test_launch.py, started by `rest_jax.launch.run(program=...)`.

Joins the multi-process job the way every rest_jax subcommand does (`initialize_multihost`), builds a
global array from process-local rows and prints the jitted global sum, then acts out the test's
scenario: `ok`, `fail:N` (process 1 exits with status N), `kill` (process 1 SIGKILLs itself, the
others then wait in a collective), `sleep` (process 1 fails, the others sleep).
"""

import os
import signal
import sys
import time

# Default Ctrl-C handling, as rest_jax.main sets it (a background job's children inherit SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)

import jax
import numpy as np

from rest_jax import partitioning

scenario = sys.argv[1] if len(sys.argv) > 1 else "ok"
partitioning.initialize_multihost(heartbeat_timeout_s=int(os.environ.get("HEARTBEAT_S", "60")))
index, count = jax.process_index(), jax.process_count()
mesh = partitioning.create_mesh()
local_rows = np.arange(jax.local_device_count() * 3, dtype=np.float32).reshape(-1, 3) + 100 * index
batch = partitioning.shard_batch({"x": local_rows}, mesh)
total = jax.jit(lambda b: b["x"].sum())(batch)
print(f"process {index} of {count}: {jax.device_count()} devices, global sum {float(total):.1f}", flush=True)
# The partitioner gathers rows that live on other processes, and places host values on the global mesh.
part = partitioning.Partitioner(mesh, partitioning.standard_logical_axis_rules())
gathered = part.gather(batch["x"])
placed, _ = part.place({"w": np.full((3,), 2.0, np.float32)})
print(f"process {index}: gathered {gathered.shape} sum {float(gathered.sum()):.1f}, placed sum "
      f"{float(jax.jit(lambda t: t['w'].sum())(placed)):.1f}", flush=True)

if scenario == "generate":
    # Evaluation split across processes: every process gets what one process decoding everything gets.
    import gin

    from rest_jax import policy as policy_lib
    from rest_jax.model import t5

    from rest_jax import gin_utils

    gin_utils.parse(["models/tiny.gin"], [], gin_utils.default_search_paths())
    model = t5.build_model()
    params = jax.device_get(part.init(lambda key: t5.init_params(model, key), jax.random.key(0))[0])

    class Bytes:  # a vocabulary of byte values, enough to decode and detokenize
        vocab_size = 256

        def encode(self, text):
            return [3 + (b % 200) for b in text.encode()]

        def decode(self, ids):
            return " ".join(str(i) for i in ids)

    policy = policy_lib.Policy(model, params, Bytes())
    sources = [f"source sentence number {i}" * (1 + i % 3) for i in range(7)]
    kwargs = dict(method="sample", num_samples=2, batch_size=2, max_decode_length=6, temperature=1.0, seed=3)
    split = policy.generate(sources, split_across_processes=True, **kwargs)
    whole = policy.generate(sources, **kwargs)
    same = split.texts == whole.texts and all(
        np.array_equal(a, b) for x, y in zip(split.tokens, whole.tokens) for a, b in zip(x, y))
    print(f"process {index}: split generate equals whole: {same} ({len(split.texts)} sources)", flush=True)

# A failing rest_jax process exits at once (rest_jax.main.console_main), skipping jax.distributed's
# shutdown barrier, which would hold it until its peers finish; do the same.
if scenario.startswith("fail:") and index == 1:
    os._exit(int(scenario.split(":")[1]))
if scenario == "sleep":
    if index == 1:
        os._exit(5)
    time.sleep(600)
if scenario == "kill":
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(2)
    started = time.monotonic()
    try:
        for _ in range(10_000):  # collectives with a dead peer: must fail, not hang
            total = jax.jit(lambda b: b["x"].sum())(partitioning.shard_batch({"x": local_rows}, mesh))
            float(total)
            time.sleep(0.1)
    finally:
        print(f"survivor stopped after {time.monotonic() - started:.1f} s", flush=True)
