import numpy as np
import pytest
import torch

from helpers import merge_job, read_shard
from icl_scale.capture.shards import ShardWriter, done_ids, split_scores, verified_shards
from icl_scale.errors import UserError
from icl_scale.runtime.rundir import remove_orphans

META = {"config_hash": "abc", "task": "cb", "setting": "icl", "seed": 1}


def record(i, n):
    g = torch.Generator().manual_seed(i)
    return {"id": i, "gold": i % 3, "pred": (i + 1) % 3, "option_scores": [0.1 * i, -1.0, -2.0],
            "attn_out": torch.randn(2, 8, generator=g), "scores": torch.randn(2, 4, n, generator=g)}


def test_roundtrip_bounded_shards_and_resume(tmp_path):
    jd = tmp_path / "job"
    w = ShardWriter(jd, META, rank=0, world_size=1, max_bytes=400)
    recs = [record(i, 3 + i % 4) for i in (5, 1, 9, 3)]
    for r in recs:
        w.add(r)
    w.close()
    shards = verified_shards(jd, "abc")
    assert len(shards) >= 2  # the byte bound splits the stream
    assert done_ids(jd, "abc") == {1, 3, 5, 9}
    merged = merge_job(jd, "abc", [1, 3, 5, 9], keys=("ids", "pred", "option_scores"))
    assert merged["ids"].tolist() == [1, 3, 5, 9] and merged["pred"].tolist() == [2, 1, 0, 1]
    got = {}
    for p, _ in shards:
        s = read_shard(p, ("ids", "attn_out", "scores", "n_keys"))
        meta = s["_meta"]
        assert meta["task"] == "cb" and meta["config_hash"] == "abc" and meta["rank"] == "0"
        for i, a, sc in zip(s["ids"], s["attn_out"], split_scores(s["scores"], s["n_keys"], 2, 4)):
            got[int(i)] = (a, sc)
    for r in recs:
        a, sc = got[r["id"]]
        np.testing.assert_allclose(a, r["attn_out"].numpy(), atol=1e-2)
        np.testing.assert_allclose(sc, r["scores"].numpy(), atol=1e-2)
    # a second writer on the same dir continues the sequence instead of overwriting
    w2 = ShardWriter(jd, META, rank=0, world_size=1, max_bytes=400)
    w2.add(record(11, 2))
    w2.close()
    assert done_ids(jd, "abc") == {1, 3, 5, 9, 11}


def test_corrupt_missing_foreign_and_duplicate_shards_are_named(tmp_path):
    jd = tmp_path / "job"
    w = ShardWriter(jd, META, 0, 1, max_bytes=1)
    for i in range(3):
        w.add(record(i, 2))
    w.close()
    first = jd / "r0-00000.safetensors"
    blob = bytearray(first.read_bytes())
    blob[-1] ^= 1
    first.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="r0-00000.safetensors: sha256"):
        merge_job(jd, "abc", [0, 1, 2])
    first.unlink()
    with pytest.raises(UserError, match="r0-00000.safetensors: listed .* but missing"):
        merge_job(jd, "abc", [0, 1, 2])
    with pytest.raises(UserError, match="manifest-r0.json: written by config abc, not zzz"):
        merge_job(jd, "zzz", [1, 2])
    clean = tmp_path / "clean"
    w = ShardWriter(clean, META, 0, 1, max_bytes=1)
    w.add(record(1, 2))
    w.close()
    other = tmp_path / "other"
    w = ShardWriter(other, META | {"config_hash": "zzz"}, 1, 2, max_bytes=1)
    w.add(record(7, 2))
    w.close()
    (other / "r1-00000.safetensors").rename(clean / "r1-00000.safetensors")
    with pytest.raises(UserError, match="r1-00000.safetensors: not listed"):
        merge_job(clean, "abc", [1])
    (clean / "r1-00000.safetensors").unlink()
    dup = ShardWriter(clean, META, 1, 2, max_bytes=1)
    dup.add(record(1, 2))
    dup.close()
    with pytest.raises(UserError, match="example id 1 also in"):
        merge_job(clean, "abc", [1])


def test_orphans_of_a_kill_are_removed(tmp_path):
    jd = tmp_path / "shards" / "cb" / "icl" / "seed1"
    w = ShardWriter(jd, META, 0, 1, max_bytes=1)
    w.add(record(0, 2))
    w.close()
    (jd / "r0-00001.safetensors").write_bytes(b"renamed but never listed")
    (jd / ".r0-00002.safetensors.tmp123").write_bytes(b"half")
    gone = remove_orphans(tmp_path, "abc")
    assert sorted(p.name for p in gone) == [".r0-00002.safetensors.tmp123", "r0-00001.safetensors"]
    assert merge_job(jd, "abc", [0])["ids"].tolist() == [0]


def test_values_beyond_float16_are_kept_not_inf(tmp_path):
    """A diverged finetuning (the untrained model, linearized, at AG News' rate) gives activations
    past float16's range; the shard keeps them in float32 and the merge reads them back finite."""
    jd = tmp_path / "job"
    big, small = record(1, 3), record(2, 3)
    big["attn_out"] = big["attn_out"] * 1e6
    big["scores"] = big["scores"] * 1e9
    w = ShardWriter(jd, META, rank=0, world_size=1, max_bytes=1 << 20, record_dtype="float16")
    for r in (big, small):
        w.add(r)
    w.close()
    merged = merge_job(jd, "abc", [1, 2], keys=("ids", "attn_out", "scores"))
    assert np.isfinite(merged["attn_out"]).all()
    np.testing.assert_allclose(merged["attn_out"][0], big["attn_out"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(merged["scores"][0], big["scores"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(merged["attn_out"][1], small["attn_out"].numpy(), atol=1e-2)
    # records within float16's range are still stored at half width
    jd2 = tmp_path / "job2"
    w = ShardWriter(jd2, META, rank=0, world_size=1, max_bytes=1 << 20, record_dtype="float16")
    w.add(record(3, 3))
    w.close()
    (path, _), = verified_shards(jd2, "abc")
    assert read_shard(path, ("attn_out",))["attn_out"].dtype == np.float16


def test_records_are_float32_by_default(tmp_path):
    """Full precision unless asked otherwise: float16 would round away small FT updates."""
    jd = tmp_path / "job"
    w = ShardWriter(jd, META, rank=0, world_size=1, max_bytes=1 << 20)
    rec = record(4, 3)
    w.add(rec)
    w.close()
    (path, _), = verified_shards(jd, "abc")
    got = read_shard(path, ("attn_out", "scores"))
    assert got["attn_out"].dtype == np.float32 and got["scores"].dtype == np.float32
    np.testing.assert_array_equal(got["attn_out"][0], rec["attn_out"].numpy())
    np.testing.assert_array_equal(got["scores"], rec["scores"].numpy().reshape(-1))
