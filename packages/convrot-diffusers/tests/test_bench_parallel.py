"""The multi-GPU benchmark's workers run (CPU, shrunken widths, a group of one process), so that the
script cannot rot between two-GPU runs; the launcher around them is `torchrun`'s."""

import json

import parallel_ranks
from conftest import load_benchmark


def test_workers_write_their_results(tmp_path, monkeypatch):
    bench = load_benchmark("bench_parallel")
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    small = ["--tiny", "--flux-blocks=1,2", "--images=2", "--steps=1", "--iters=2", "--warmup=0"]
    for kind in ("data", "context"):
        monkeypatch.setenv("MASTER_PORT", str(parallel_ranks.free_port()))
        out = tmp_path / f"{kind}.json"
        bench.main(["--worker", kind, "--worker-out", str(out), *small])
        found = json.loads(out.read_text())
        assert found["world_size"] == 1
        if kind == "data":
            assert found["images"] == 2 and found["images_per_s"] > 0
        else:
            assert len(found["ms_all"]) == 2 and found["ms_per_step"] > 0
