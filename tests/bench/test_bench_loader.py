"""``python -m vtc.bench.loader`` stays runnable: its pieces on a handful of samples."""
from vtc.bench import loader as B


def test_loader_benchmark_pieces(tmp_path):
    data = B.make_data(tmp_path, 16)
    assert len(data["keys"]) == 16 and len(data["shards"]) == 8
    r = B.loader_throughput(data, workers=0, batch_size=4, image_size=28, shuffle_buffer=8, repeats=1)
    assert r["shard_sps"] > 0 and r["loose_sps"] > 0 and r["samples_timed"] == 12  # 4 batches, the first untimed
    assert r["shard_cpu_ms"] > 0 and r["loose_cpu_ms"] > 0
    table = B.report({"args": {"batch_size": 4, "image_size": 28}, "loader": [r],
                      "convert": {"samples": 4, "workers": 1, "sps": 2.0},
                      "wait": {"steps": 3, "batch_size": 32, "num_workers": 1, "share": 0.01, "step_s": 0.2}})
    assert "shards / loose" in table and "data wait 1.0% of 200 ms/step" in table and "PASS" in table
